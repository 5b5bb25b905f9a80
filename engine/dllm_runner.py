"""The diffusion-LM model runner: one worker's dLLM requests and their packed denoising step.

The same contract as `engine.runner.ModelRunner` for video, so `StepSchedulerCore`
schedules both: a `NewDllmRequest` arrives once with the first plan that runs it and
becomes a `DllmSequence` (prompt + masked response, its own seeded generator) on this
worker's device; every plan then runs all of a model's scheduled sequences in one
packed, non-causal forward (different prompt and response lengths, different step
indices), computing the vocabulary projection only at the rows that predict a masked
token, and applies each sequence's own unmasking rule. The answer names the ids
stepped, the response ids of the sequences that finished (their only trip off the
device) and, for streams, the response prefixes that grew. A sequence finishes at its
last step or as soon as its answer is final (no mask left, or an EOS right after a fully
unmasked prefix: the masks after it cannot change the text), which frees its seat early. A packed forward that
raises is retried sequence by sequence, so only the request at fault fails.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.messages import DllmStepResult, NewDllmRequest, StepPlan
from engine.runner_steps import admit_new, scheduled_states
from models.dllm.decoding import DllmSequence
from models.dllm.model import DiffusionLM

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Held:
    """One request on this worker: its model, its decoding state, and how much of its response was reported."""

    request_id: str
    model: str
    sequence: DllmSequence
    reported: int = 0  # response tokens already sent in `DllmStepResult.prefixes`


@dataclass(frozen=True)
class DllmModel:
    """A loaded diffusion LM and the token ids its decoder needs."""

    network: DiffusionLM
    mask_id: int
    stop_ids: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device


class DllmRunner:
    def __init__(self, models: Mapping[str, DllmModel]) -> None:
        self.models = models
        self.held: dict[str, _Held] = {}
        self._last_step_end: float | None = None

    def execute(self, plan: StepPlan) -> DllmStepResult:
        start = time.perf_counter()
        idle = 0.0 if self._last_step_end is None else start - self._last_step_end
        for request_id in plan.free:
            self.held.pop(request_id, None)
        errors = admit_new(plan, self._admit)
        batch: dict[str, list[_Held]] = defaultdict(list)  # model -> its requests, packed order
        for held in scheduled_states(plan, errors, self.held, lambda h: h.sequence.step_index):
            batch[held.model].append(held)
        stepped: list[str] = []
        finished: dict[str, tuple[int, ...]] = {}
        prefixes: dict[str, tuple[int, ...]] = {}
        forwards = 0
        for model, requests in batch.items():
            forwards += self._denoise(model, requests, errors)
            for held in requests:
                if held.request_id in errors:
                    continue
                stepped.append(held.request_id)
                response = held.sequence.response_ids()
                if len(response) > held.reported:
                    prefixes[held.request_id] = tuple(response)
                    held.reported = len(response)
                if held.sequence.final:  # its text can no longer change: finished, whatever steps were planned
                    finished[held.request_id] = tuple(response)
                    del self.held[held.request_id]
        for request_id in errors:
            self.held.pop(request_id, None)
        self._last_step_end = time.perf_counter()
        return DllmStepResult(step_id=plan.step_id, stepped=tuple(stepped), errors=errors, finished=finished,
                              forwards=forwards, forward_seconds=self._last_step_end - start, idle_before_seconds=idle,
                              prefixes=prefixes)

    def _admit(self, new: NewDllmRequest) -> None:
        if new.request_id in self.held:
            raise ValueError(f"request {new.request_id!r} is already held by this runner")
        if new.model not in self.models:
            raise ValueError(f"unknown diffusion LM {new.model!r}; this worker serves {sorted(self.models)}")
        model = self.models[new.model]
        limit = model.network.config.max_position_embeddings
        if new.seq_len > limit:
            raise ValueError(f"prompt {len(new.prompt_ids)} + max_tokens {new.params.max_tokens} tokens exceed the "
                             f"model's context of {limit}")
        sequence = DllmSequence(list(new.prompt_ids), new.params, model.mask_id, model.stop_ids, model.device)
        self.held[new.request_id] = _Held(new.request_id, new.model, sequence)

    @torch.no_grad()
    def _denoise(self, model: str, requests: list[_Held], errors: dict[str, str]) -> int:
        """One packed forward, then each sequence's own step; returns the forwards run (more than 1 only when a
        packed forward raised and the sequences were run one by one to find the one at fault)."""
        try:
            logits = self._logits(model, [h.sequence for h in requests])
            runs = 1
        except Exception:
            logger.exception("packed forward of %s failed; isolating %d requests", model, len(requests))
            logits, runs = [], 1 + len(requests)
            for held in requests:
                try:
                    logits.append(self._logits(model, [held.sequence])[0])
                except Exception as exc:
                    errors[held.request_id] = f"diffusion LM forward failed: {exc!r}"
                    logits.append(None)
        for held, chunk in zip(requests, logits):
            if chunk is None:
                continue
            try:
                held.sequence.step(chunk)
            except Exception as exc:  # a decoding fault fails this request only
                logger.exception("decoding step failed for %s", held.request_id)
                errors[held.request_id] = f"decoding step failed: {exc!r}"
        return runs

    def _logits(self, model: str, sequences: list[DllmSequence]) -> list[torch.Tensor]:
        """Each sequence's logits at the rows predicting its masked tokens, from one packed forward (over the tail
        after its cached prefix, for a sequence decoding block-wise with the prefix cache)."""
        offset, rows = 0, []
        for sequence in sequences:
            rows.append(sequence.logit_rows() + offset)
            offset += sequence.length - sequence.forward_start
        ids = torch.cat([s.forward_tokens() for s in sequences])
        lengths = [s.length - s.forward_start for s in sequences]
        network = self.models[model].network
        if any(s.params.prefix_cache for s in sequences):
            logits, captured = network.forward_cached(ids, lengths, torch.cat(rows), [s.prefix_kv for s in sequences],
                                                      [s.prefix_to_capture for s in sequences])
            for sequence, prefix in zip(sequences, captured):
                if prefix.length:
                    sequence.prefix_kv = prefix
        else:
            logits = network.forward_packed(ids, lengths, logit_rows=torch.cat(rows))
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits")
        return list(logits.float().split([len(r) for r in rows]))
