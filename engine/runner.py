"""The model runner: one rank's persistent batch and its step.

Request state lives here, on the runner's device, from admission to finish: the
latents, the request's own diffusers sampler (they are stateful), per-request
sampler extras and the prompt embeddings. A `StepPlan` names which requests run
this step and in which order; `execute` then

    frees cancelled requests and admits new ones (seeded noise, a fresh sampler),
    prepare_inputs()   groups the scheduled requests by model, packed order kept,
    TeaCache requests decide from their timestep modulation whether this step skips,
    one packed transformer forward per model (all shapes, text lengths, timesteps) over
    the requests whose step computes (FirstBlockCache requests: their first block, the
    other blocks only if it changed enough), classifier-free guidance; a step the request's
    step cache stands in for (no rows in the plan, or TeaCache's skip) takes its prediction
    from that cache (TaylorSeer: extrapolated; MagCache and TeaCache: the embeddings and head
    of the request's rows alone, the blocks replaced by their last residual, on every rank of
    a group alike); then each request's own sampler.step() on the device,

and answers with a `VideoStepResult`: ids stepped, those whose cache decided in the step to
skip (`skipped_in_step`), per-request errors, and the final latents of the requests that
finished (their only trip off the device). If a model's packed forward raises, its requests
are retried one by one so only the request at fault fails.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist

from attention.context import AttentionContext, LocalAttention, ShardedAttention
from engine.messages import NewRequest, StepPlan, VideoStepResult
from engine.runner_steps import admit_new, scheduled_states
from models.base import DiffusionAdapter
from models.block_caches import BlockCaches
from models.interface import EncodedPrompt
from models.step_cache_state import (
    CacheState,
    FirstBlockResiduals,
    MagCacheResiduals,
    TaylorSeerPrediction,
    TeaCacheResiduals,
    new_cache_state,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RunnerRequest:
    """One request's device state."""

    request: NewRequest
    prompt: EncodedPrompt  # on the runner's device
    latents: torch.Tensor  # (1, *latent_shape), float32, on the runner's device
    sampler: Any
    step: int = 0
    sampler_extra: dict[str, Any] = field(default_factory=dict)
    cache: CacheState | None = None  # the request's step-cache state (None: every step computes)

    @property
    def timestep(self) -> torch.Tensor:
        return self.sampler.timesteps[self.step]

    @property
    def total_steps(self) -> int:
        return len(self.sampler.timesteps)


class ModelRunner:
    """One rank's runner. With `world_size` > 1 every rank of the group holds every request (replicated
    state), computes its Brick shards of each forward row, all-gathers the outputs inside the group, and
    runs the same sampler steps: ranks stay identical without any tensor leaving the group.
    """

    def __init__(self, adapters: Mapping[str, DiffusionAdapter], rank: int = 0, world_size: int = 1,
                 group: dist.ProcessGroup | None = None) -> None:
        self.adapters = adapters
        self.rank, self.world_size, self.group = rank, world_size, group
        self.requests: dict[str, RunnerRequest] = {}
        self._last_step_end: float | None = None

    def execute(self, plan: StepPlan) -> VideoStepResult:
        start = time.perf_counter()
        idle = 0.0 if self._last_step_end is None else start - self._last_step_end
        for request_id in plan.free:
            self.requests.pop(request_id, None)
        errors = admit_new(plan, self._admit)
        batch = self.prepare_inputs(plan, errors)
        cached_ids = {s.request_id for s in plan.scheduled if not s.computed}
        skipped_in_step = self._teacache_skips(batch, errors)  # FirstBlockCache's skips join in the forward
        cached_ids |= skipped_in_step
        batch = {model: [r for r in requests if r.request.request_id not in errors]
                 for model, requests in batch.items()}
        stepped: list[str] = []
        finished: dict[str, torch.Tensor] = {}
        forwards = ring_bytes = 0
        shapes = set()
        for model, requests in batch.items():
            computed = [r for r in requests if r.request.request_id not in cached_ids]
            predictions = [(r, p) for r in requests if r.request.request_id in cached_ids
                           if (p := self._cached_prediction(model, r, errors)) is not None]
            if computed:
                ctx = self._context(plan, model, computed)
                forwarded, runs = self._predict(model, computed, errors, ctx, skipped_in_step)
                self._update_caches(model, forwarded)
                predictions += forwarded
                forwards += runs
                ring_bytes += ctx.stats.bytes_sent if isinstance(ctx, ShardedAttention) else 0
                shapes.update((model, r.request.latent_shape) for r in computed)
            for request, prediction in predictions:
                self._advance(model, request, prediction, errors, stepped, finished)
        for request_id in errors:
            self.requests.pop(request_id, None)
        self._last_step_end = time.perf_counter()
        return VideoStepResult(step_id=plan.step_id, stepped=tuple(stepped), errors=errors, finished=finished,
                               skipped_in_step=tuple(r for r in stepped if r in skipped_in_step),
                               forwards=forwards, shapes=len(shapes), forward_seconds=self._last_step_end - start,
                               idle_before_seconds=idle, ring_bytes=ring_bytes)

    # ---- admission --------------------------------------------------------
    def _admit(self, new: NewRequest) -> None:
        if new.request_id in self.requests:
            raise ValueError(f"request {new.request_id!r} is already held by this runner")
        if new.prompt is None:
            raise ValueError("a NewRequest without prompt embeddings cannot run")
        adapter = self.adapters[new.model]
        prompt = new.prompt.with_condition(adapter.request_condition(new.fps))
        for cond in prompt.rows_in_order:
            adapter.check_condition(cond, new.latent_shape)
        sampler = adapter.new_sampler(new.num_steps, new.latent_shape)
        if len(sampler.timesteps) != new.num_steps:
            raise ValueError(f"the sampler made {len(sampler.timesteps)} timesteps for {new.num_steps} steps")
        noise = adapter.initial_latents(new.latent_shape, new.seed, sampler)
        latents = adapter.condition_latents(noise, prompt.rows_in_order[0]).to(adapter.device)
        self.requests[new.request_id] = RunnerRequest(new, prompt.to(adapter.device), latents, sampler,
                                                      cache=new_cache_state(new.cache))

    # ---- the step ---------------------------------------------------------
    @torch.no_grad()
    def _teacache_skips(self, batch: dict[str, list[RunnerRequest]], errors: dict[str, str]) -> set[str]:
        """TeaCache requests whose step skips the blocks, decided from their timestep modulation before the forward
        (they then take MagCache's skipped-step path; every rank of a group decides alike from the same state)."""
        skipping = set()
        for model, requests in batch.items():
            for r in requests:
                if not isinstance(r.cache, TeaCacheResiduals):
                    continue
                try:
                    if not r.cache.computes(r.step, self.adapters[model].timestep_modulation(r.timestep)):
                        skipping.add(r.request.request_id)
                except Exception as exc:  # a step-cache fault fails this request only
                    logger.exception("TeaCache decision of %s failed at step %d", r.request.request_id, r.step)
                    errors[r.request.request_id] = f"step cache failed: {exc}"
        return skipping

    def prepare_inputs(self, plan: StepPlan, errors: dict[str, str]) -> dict[str, list[RunnerRequest]]:
        """Scheduled requests grouped by model, in packed order; unknown or out-of-step ones fail."""
        batch: dict[str, list[RunnerRequest]] = defaultdict(list)
        for request in scheduled_states(plan, errors, self.requests, lambda r: r.step):
            batch[request.request.model].append(request)
        return batch

    def _context(self, plan: StepPlan, model: str, requests: list[RunnerRequest]) -> AttentionContext:
        """Local attention on one rank; on a group, the model's Brick plan restricted to the rows still running."""
        if self.world_size == 1:
            return LocalAttention()
        running = {r.request.request_id for r in requests}
        rows, row = [], 0
        for scheduled in plan.scheduled:  # this model's rows in the plan, minus those of requests that failed
            if scheduled.model != model:
                continue
            if scheduled.request_id in running:
                rows.extend(range(row, row + scheduled.rows))
            row += scheduled.rows
        return ShardedAttention(plan.rings[model].subset(rows), self.rank, self.group)

    @torch.no_grad()
    def _predict(self, model: str, requests: list[RunnerRequest], errors: dict[str, str], ctx: AttentionContext,
                 skipped_in_step: set[str]) -> tuple[list[tuple[RunnerRequest, torch.Tensor]], int]:
        """Guided predictions of one model's requests in one packed forward.

        On one rank a forward that raises is retried request by request, so only the request at
        fault fails. On a group the ranks are inside collectives together: a raise there is a
        group fault (the shell rebuilds the group); bad inputs are refused at admission instead.
        """
        experts = len({self.adapters[model].expert_index(r.timestep) for r in requests})
        try:
            return list(zip(requests, self._guided(model, requests, ctx, skipped_in_step))), experts
        except Exception:
            if self.world_size > 1:
                raise
            logger.exception("packed forward of %s failed; isolating %d requests", model, len(requests))
        out = []
        for request in requests:
            try:
                out.append((request, self._guided(model, [request], ctx, skipped_in_step)[0]))
            except Exception as exc:
                errors[request.request.request_id] = f"transformer forward failed: {exc!r}"
        return out, experts + len(requests)

    def _guided(self, model: str, requests: list[RunnerRequest], ctx: AttentionContext, skipped_in_step: set[str],
                ) -> list[torch.Tensor]:
        """One packed forward (one per expert of a two-expert model) over every CFG row ([uncond, cond] per request
        with CFG), each request guided by its expert's scale; float32 predictions. Block-level step caches keep
        their rows' residuals in the request's state (MagCache; FirstBlockCache when its step computed, else its
        id goes to `skipped_in_step`)."""
        adapter = self.adapters[model]
        latents, timesteps, conds, caches = [], [], [], BlockCaches()
        for r in requests:
            x = _model_input(r).to(adapter.dtype)
            rows = range(len(conds), len(conds) + r.request.rows)
            if isinstance(r.cache, MagCacheResiduals):
                caches.keep.extend(rows)
            elif isinstance(r.cache, FirstBlockResiduals):
                caches.first_block.append(r.cache.rows(rows))
            for cond in r.prompt.rows_in_order:
                latents.append(x)
                timesteps.append(r.timestep)
                conds.append(cond)
        block_caches = caches if caches.keep or caches.first_block else None
        out = adapter.forward_packed(latents, timesteps, conds, ctx, block_caches)
        preds, row = [], 0
        for r in requests:
            rows = range(row, row + r.request.rows)
            if isinstance(r.cache, MagCacheResiduals):
                r.cache.rows = [caches.blocks_residual[i] for i in rows]
            elif isinstance(r.cache, FirstBlockResiduals) and r.cache.update(rows, caches):
                skipped_in_step.add(r.request.request_id)
            preds.append(self._guide(model, r, [out[i] for i in rows]))
            row += r.request.rows
        return preds

    def _guide(self, model: str, request: RunnerRequest, rows: list[torch.Tensor]) -> torch.Tensor:
        """A request's float32 prediction from its rows' outputs ([uncond, cond] with CFG)."""
        if not request.request.cfg:
            return rows[0].float()
        uncond, text = rows[0].float(), rows[1].float()
        adapter = self.adapters[model]
        return uncond + request.request.guidance_at(adapter.expert_index(request.timestep)) * (text - uncond)

    @torch.no_grad()
    def _cached_prediction(self, model: str, request: RunnerRequest, errors: dict[str, str]) -> torch.Tensor | None:
        """The prediction a request's step cache gives for a step that runs no forward (None: it failed)."""
        adapter = self.adapters[model]
        try:
            if isinstance(request.cache, TaylorSeerPrediction):
                return request.cache.predict(request.step, adapter.expert_index(request.timestep))
            if isinstance(request.cache, MagCacheResiduals):
                x = _model_input(request).to(adapter.dtype)
                return self._guide(model, request, [
                    adapter.skipped_blocks_prediction(x, request.timestep, cond, residual)
                    for cond, residual in zip(request.prompt.rows_in_order, request.cache.residuals(request.step))])
            errors[request.request.request_id] = f"step {request.step} is planned cached but the request has no cache"
        except Exception as exc:  # a step-cache fault fails this request only
            logger.exception("step cache of %s failed at step %d", request.request.request_id, request.step)
            errors[request.request.request_id] = f"step cache failed: {exc}"
        return None

    def _update_caches(self, model: str, predictions: list[tuple[RunnerRequest, torch.Tensor]]) -> None:
        """Computed predictions of TaylorSeer requests feed their cache (what later cached steps extrapolate from)."""
        for request, prediction in predictions:
            if isinstance(request.cache, TaylorSeerPrediction):
                request.cache.update(request.step, self.adapters[model].expert_index(request.timestep), prediction)

    def _advance(self, model: str, request: RunnerRequest, prediction: torch.Tensor, errors: dict[str, str],
                 stepped: list[str], finished: dict[str, torch.Tensor]) -> None:
        request_id = request.request.request_id
        try:
            request.latents = self.adapters[model].sampler_step(request.sampler, prediction, request.timestep,
                                                                request.latents, request.sampler_extra)
        except Exception as exc:  # a sampler fault fails this request only
            logger.exception("sampler step failed for %s", request_id)
            errors[request_id] = f"sampler step failed: {exc!r}"
            return
        if not torch.isfinite(request.latents).all():
            errors[request_id] = f"non-finite latents after step {request.step + 1}"
            return
        request.step += 1
        stepped.append(request_id)
        if request.step == request.total_steps:
            finished[request_id] = request.latents.cpu()
            del self.requests[request_id]


def _model_input(request: RunnerRequest) -> torch.Tensor:
    """Latents as the transformer takes them at this step (some samplers rescale them), without the batch dim."""
    scale = getattr(request.sampler, "scale_model_input", None)  # flow-matching samplers have none
    latents = scale(request.latents, request.timestep) if scale is not None else request.latents
    return latents[0]
