"""StepScheduler: the Serve shell of `engine.StepSchedulerCore` and the owner of one DiT worker group.

One replica = one scheduler + one worker group of N rank actors (its placement
group). `generate()` streams a request's progress while it is pooled and ends
with its result, so a job's calls never need to find "its" replica again: the
ingress reads progress from the stream and cancels by cancelling the stream.
Scaling out adds replicas, each with its own group.

The step loop is the engine's (`engine.engine.EngineCore.run`) with the worker group as
its executor: plan k+1 is built and sent while step k runs, so the ranks start the next
forward as soon as they end the last one (`ray_dit_step_gap_seconds` measures what is
left). If a rank dies or a step fails on the group, the group is rebuilt and every
request it held restarts from step 0 (same seed, same result); results of plans sent
to the old group are dropped. This shell admits, streams and cancels, and records the
group's metrics as the engine's listener.

Every step's measured time feeds the core's step-cost model (`engine.step_cost`), which
decides how many requests a step holds; at start-up a probe (each model's smallest and
largest default request, one step alone and together, prompts from the TextEncoder)
seeds it. Where the VAE decoder shares the ranks' cores (`decode_displaces_ranks`), the
replica reads the decoder's running decodes every `DECODER_POLL_S` and plans steps on the
ranks they leave free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from api.config import WorkerGroupConfig
from api.validation import RequestValidator, ServedModel
from deployments.metrics import ServeMetrics
from deployments.text_encoder import EncodeRequest
from deployments.worker_group import WorkerGroup
from engine.config import SchedulerConfig
from engine.engine import Ended, EngineCore, Executed, StepListener
from engine.messages import NewRequest, StepPlan
from engine.request import GenerationSpec, RequestStatus
from engine.step_cost import forward_key
from models import load_adapter
from models.interface import Condition, EncodedPrompt
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
DECODER_POLL_S = 0.2
"""How often the scheduler reads the VAE decoder's running decodes (decode_displaces_ranks > 0)."""


@dataclass(frozen=True)
class ProgressEvent:
    """Streamed by `generate()` when a request's step count changes (coalesced: the latest is sent)."""

    steps_done: int
    total_steps: int
    first_step_time: float | None


@dataclass
class GenerationResult:
    """The last item `generate()` streams, when the request leaves the pool."""

    request_id: str
    status: RequestStatus
    latents: ray.ObjectRef | None  # final latents (1, *latent_shape) when finished, held by this replica
    latent_elements: int  # their element count (the decode's size, which orders the decode queue)
    error: str | None
    arrival_time: float
    first_step_time: float | None
    finish_time: float | None
    restarts: int = 0
    computed_steps: int = 0  # steps that ran the transformer (the others came from the request's step cache)


@dataclass
class _Waiter:
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    result: GenerationResult | None = None
    cache_mode: str = "none"  # the request's step cache, for the cache-hit counter


@serve.deployment(max_ongoing_requests=100_000)
class StepScheduler(StepListener):
    """`max_ongoing_requests` is effectively unbounded because every pooled request is an ongoing
    call; admission is bounded by `max_pool_size` instead (engine's PoolFullError)."""

    async def __init__(self, models: list[ModelSpec], scheduler: SchedulerConfig, worker_group: WorkerGroupConfig,
                       text_encoder: DeploymentHandle, vae: DeploymentHandle, decode_displaces_ranks: int = 0) -> None:
        self.adapters = {s.name: load_adapter(s, parts=()) for s in models}
        self.engine = EngineCore.from_config(
            scheduler, world_size=worker_group.ranks,
            one_rank_models=frozenset(n for n, a in self.adapters.items() if not a.shardable))
        self.core = self.engine.scheduler
        self.group = WorkerGroup(models, worker_group)
        self.metrics = ServeMetrics()
        self._waiters: dict[str, _Waiter] = {}
        self._ring_sizes: Counter[int] = Counter()  # forward rows per ring size, since start
        self._loop_task: asyncio.Task | None = None
        await self.group.start()  # the replica is ready when its group is (models loaded on every rank)
        await self._probe(models, text_encoder)
        self._ensure_loop()
        self._decoder_watch = (asyncio.get_running_loop().create_task(self._watch_decoder(vae, decode_displaces_ranks))
                               if decode_displaces_ranks else None)

    async def _watch_decoder(self, vae: DeploymentHandle, displaced_per_decode: int) -> None:
        """Where decodes share the ranks' cores, plan steps on the ranks the running decodes leave free."""
        while True:
            try:
                decoding = (await vae.load.remote())["decoding"]
                busy = decoding * displaced_per_decode
            except Exception:  # the decoder replica is being replaced: plan on every rank meanwhile
                logger.warning("reading the VAE decoder's load failed", exc_info=True)
                busy = 0
            before = self.core.usable_ranks
            self.core.set_busy_ranks(busy)
            if self.core.usable_ranks > before:
                self.engine.wake()  # ranks freed: the loop may plan again
            await asyncio.sleep(DECODER_POLL_S)

    async def _probe(self, specs: list[ModelSpec], text_encoder: DeploymentHandle) -> None:
        """Seed the step-cost model: time one step of each model's smallest and largest default request, alone and
        together, on the group (twice: the first pass pays one-off kernel and allocator warm-up)."""
        validator = RequestValidator({s.name: ServedModel.of(self.adapters[s.name]) for s in specs}, 10**6)
        probes = []
        for spec in specs:
            for index, gen in enumerate(validator.probe_specs(spec.name)):
                adapter = self.adapters[spec.name]
                prompt = await text_encoder.encode.remote(EncodeRequest(gen.model, gen.prompt, gen.negative_prompt))
                prompt = prompt.with_condition(adapter.image_placeholder(
                    adapter.latent_shape(gen.height, gen.width, gen.num_frames)))
                probes.append(NewRequest.from_spec(f"{spec.name}-{index}", gen, prompt, adapter))
        plans = self.core.probe_plans(probes)
        start = time.perf_counter()
        for _ in range(2):  # the first pass pays the warm-up; the second is timed
            timed = [(plan, (await self.group.execute(plan)).seconds) for plan in plans]
        self.engine.seed_cost_model(timed)
        logger.info("step-cost probe: %d steps in %.1f s; %s", 2 * len(plans), time.perf_counter() - start,
                    {key: self.core.step_cost.coefficients(key) for key in self._forward_keys()})

    async def generate(self, request_id: str, spec: GenerationSpec, prompt: EncodedPrompt,
                       condition: Condition | None = None) -> AsyncIterator[ProgressEvent | GenerationResult]:
        """Admit a request (PoolFullError when full); stream its progress, then its result.

        `prompt` (and an image-to-video request's `condition`, its image latents) arrive from the encoders as
        Serve responses the caller passed on. Cancelling the stream (the caller went away or cancelled the job)
        cancels the request.
        """
        self._ensure_loop()
        if condition is not None:
            prompt = prompt.with_condition(condition)
        meta = self.engine.admit(NewRequest.from_spec(request_id, spec, prompt, self.adapters[spec.model]))
        waiter = self._waiters[request_id] = _Waiter(cache_mode=spec.cache.mode)
        self.metrics.set_pool_gauges(self.core)
        try:
            sent = -1
            while waiter.result is None:
                await waiter.changed.wait()
                waiter.changed.clear()
                if waiter.result is None and meta.steps_done != sent:
                    sent = meta.steps_done
                    yield ProgressEvent(meta.steps_done, meta.total_steps, meta.first_step_time)
                    # At most one progress message per PROGRESS_INTERVAL_S (each costs every process on
                    # its path some CPU); the result itself is never delayed.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.finished.wait(), PROGRESS_INTERVAL_S)
            yield waiter.result
        finally:
            if waiter.result is None:  # cancelled: free the request's slot
                self.on_ended(self.engine.cancel(request_id))
            self._waiters.pop(request_id, None)

    async def stats(self) -> dict:
        """The group's shape and history (tests and operators)."""
        return {"pid": os.getpid(), "ranks": self.group.config.ranks, "pids": list(self.group.pids),
                "group_restarts": self.group.generation, "pooled": len(self.core.pool),
                "held_on_ranks": await self.group.held(),
                "ring_sizes": dict(self._ring_sizes),
                "step_cost": {key: self.core.step_cost.coefficients(key) for key in self._forward_keys()}}

    def _forward_keys(self) -> list[str]:
        """The step-cost model's forwards: one per model, one per expert of a two-expert model."""
        return [forward_key(name, expert) for name, adapter in self.adapters.items()
                for expert in range(adapter.expert_count)]

    async def load(self) -> dict:
        """The pool's remaining work and the measured rate it drains at: what admission's Retry-After and a queued
        job's estimated start are computed from (None before the first step)."""
        return self.engine.drain_rate.load(self.core.remaining_token_steps())

    # ---- the loop: the engine's, this shell listens -------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self.engine.run(self.group, self))

    def on_sent(self, plan: StepPlan) -> None:
        self.metrics.plan_bytes.observe(len(pickle.dumps(plan, protocol=5)))

    def on_step(self, plan: StepPlan, executed: Executed, pipelined: bool) -> None:
        m, result = self.metrics, executed.result
        m.observe_step(plan, executed.seconds, result.skipped_in_step)
        if plan.scheduled:
            m.forwards_per_step.observe(result.forwards)
            m.step_shapes.observe(result.shapes)
            if pipelined:
                m.step_gap.observe(result.idle_before_seconds)
        for rank, seconds in enumerate(executed.rank_seconds):
            if seconds > 0:  # Ray counters refuse 0
                m.rank_busy_seconds.inc(seconds, tags={"rank": str(rank)})
        if result.ring_bytes:
            m.ring_bytes.inc(result.ring_bytes)
        for rings in plan.rings.values():
            for assignment in rings.assignments:
                m.ring_size.observe(assignment.size)
                self._ring_sizes[assignment.size] += 1
        for step in plan.scheduled:
            cached = not step.computed or step.request_id in result.skipped_in_step
            if cached and (waiter := self._waiters.get(step.request_id)) is not None:
                m.cache_hits.inc(tags={"model": step.model, "mode": waiter.cache_mode})
        for request_id in result.stepped:
            if (waiter := self._waiters.get(request_id)) is not None:
                waiter.changed.set()

    def on_ended(self, ended: list[Ended]) -> None:
        self.metrics.observe_ended(ended)
        for end in ended:
            if (waiter := self._waiters.get(end.meta.request_id)) is not None:
                waiter.result = _result_of(end)
                waiter.changed.set()
                waiter.finished.set()
        self.metrics.set_pool_gauges(self.core)

    def on_recovered(self, lost: int, reason: str) -> None:
        self.metrics.group_restarts.inc()
        logger.warning("%d requests restart from step 0 (%s)", lost, reason)


def _result_of(end: Ended) -> GenerationResult:
    """The request's result; its final latents go into this replica's object store, for the VAE decoder to read."""
    meta, latents = end.meta, end.output
    return GenerationResult(request_id=meta.request_id, status=end.status,
                            latents=None if latents is None else ray.put(latents),
                            latent_elements=0 if latents is None else latents.numel(), error=end.error,
                            arrival_time=meta.arrival_time, first_step_time=meta.first_step_time,
                            finish_time=meta.finish_time, restarts=meta.restarts,
                            computed_steps=meta.computed_steps)
