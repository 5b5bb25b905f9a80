"""StepScheduler: the Serve shell of `engine.StepSchedulerCore` and the owner of one DiT worker group.

One replica = one scheduler + one worker group of N rank actors (its placement
group). `generate()` streams a request's progress while it is pooled and ends
with its result, so a job's calls never need to find "its" replica again: the
ingress reads progress from the stream and cancels by cancelling the stream.
Scaling out adds replicas, each with its own group.

The step loop keeps up to `PIPELINE_DEPTH` plans in flight: plan k+1 is built and
sent while step k runs, so the ranks start the next forward as soon as they end the
last one (`ray_dit_step_gap_seconds` measures what is left). If a rank dies or a
step fails on the group, the group is rebuilt and every request it held restarts
from step 0 (same seed, same result); results of plans sent to the old group are
dropped.

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
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from api.config import WorkerGroupConfig
from api.validation import RequestValidator, ServedModel
from deployments.drain import DrainRate
from deployments.metrics import ServeMetrics
from deployments.text_encoder import EncodeRequest
from deployments.worker_group import WorkerGroup
from engine.config import SchedulerConfig
from engine.messages import NewRequest, StepPlan, StepResult
from engine.policies import make_policy
from engine.request import GenerationSpec, RequestMeta, RequestStatus
from engine.scheduler import StepSchedulerCore
from engine.step_cost import forward_key
from models import load_adapter
from models.interface import EncodedPrompt
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

GAUGE_REFRESH_S = 5.0
PROGRESS_INTERVAL_S = 0.5
DECODER_POLL_S = 0.2
"""How often the scheduler reads the VAE decoder's running decodes (decode_displaces_ranks > 0)."""
PIPELINE_DEPTH = 2
"""Plans in flight to the group: the one running and the next one, already planned."""


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
    latents: torch.Tensor | None  # final latents (1, *latent_shape) when finished
    error: str | None
    arrival_time: float
    first_step_time: float | None
    finish_time: float | None
    restarts: int = 0


@dataclass
class _Waiter:
    new: NewRequest  # kept while pooled: a group failure re-admits it from step 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    result: GenerationResult | None = None


@dataclass
class _InFlight:
    plan: StepPlan
    pipelined: bool  # sent while another plan was running: requests were waiting on the group
    call: asyncio.Future


@serve.deployment(max_ongoing_requests=100_000)
class StepScheduler:
    """`max_ongoing_requests` is effectively unbounded because every pooled request is an ongoing
    call; admission is bounded by `max_pool_size` instead (engine's PoolFullError)."""

    async def __init__(self, models: list[dict], scheduler: dict, worker_group: dict,
                       text_encoder: DeploymentHandle, vae: DeploymentHandle, decode_displaces_ranks: int = 0) -> None:
        config = SchedulerConfig(**scheduler)
        group = WorkerGroupConfig(**worker_group)
        specs = [ModelSpec(**m) for m in models]
        self.adapters = {s.name: load_adapter(s, parts=()) for s in specs}
        self.core = StepSchedulerCore(make_policy(config.policy, config.starvation_timeout_s), config.budget,
                                      config.max_pool_size, world_size=group.ranks,
                                      cost_model=config.planner.cost_model(group.ranks),
                                      one_rank_models=frozenset(n for n, a in self.adapters.items() if not a.shardable),
                                      admission=config.admission, batch_size=config.batch_size,
                                      batching=config.batching)
        self.max_restarts = config.max_request_restarts
        self.group = WorkerGroup(models, group)
        self.metrics = ServeMetrics()
        self._waiters: dict[str, _Waiter] = {}
        self._final_latents: dict[str, torch.Tensor] = {}
        self._ring_sizes: Counter[int] = Counter()  # forward rows per ring size, since start
        self.drain_rate = DrainRate()
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        await self.group.start()  # the replica is ready when its group is (models loaded on every rank)
        await self._probe(specs, text_encoder)
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
                self._wakeup.set()  # ranks freed: the loop may plan again
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
        for warm in (False, True):
            for plan in plans:
                _, rank_seconds = await self.group.execute(plan)
                if warm:
                    self.core.observe_step(plan, max(rank_seconds))
                    self.drain_rate.observe(plan.num_tokens, max(rank_seconds))
        self.core.step_cost.seed()
        logger.info("step-cost probe: %d steps in %.1f s; %s", 2 * len(plans), time.perf_counter() - start,
                    {key: self.core.step_cost.coefficients(key) for key in self._forward_keys()})

    async def generate(self, request_id: str, spec: GenerationSpec,
                       prompt: EncodedPrompt) -> AsyncIterator[ProgressEvent | GenerationResult]:
        """Admit a request (PoolFullError when full); stream its progress, then its result.

        Cancelling the stream (the caller went away or cancelled the job) cancels the request.
        """
        self._ensure_loop()
        new = NewRequest.from_spec(request_id, spec, prompt, self.adapters[spec.model])
        meta = self.core.admit(new)
        waiter = self._waiters[request_id] = _Waiter(new)
        self._wakeup.set()
        self._update_gauges()
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
                self.core.cancel(request_id)
                self._resolve_done()
            self._waiters.pop(request_id, None)

    async def stats(self) -> dict:
        """The group's shape and history (tests and operators)."""
        return {"pid": os.getpid(), "ranks": self.group.config.ranks, "pids": list(self.group.pids),
                "group_restarts": self.group.generation, "pooled": len(self.core.pool),
                "ring_sizes": dict(self._ring_sizes),
                "step_cost": {key: self.core.step_cost.coefficients(key) for key in self._forward_keys()}}

    def _forward_keys(self) -> list[str]:
        """The step-cost model's forwards: one per model, one per expert of a two-expert model."""
        return [forward_key(name, expert) for name, adapter in self.adapters.items()
                for expert in range(adapter.expert_count)]

    async def load(self) -> dict:
        """The pool's remaining work and the measured rate it drains at: what admission's Retry-After and a queued
        job's estimated start are computed from (None before the first step)."""
        return self.drain_rate.load(self.core.remaining_token_steps())

    # ---- the loop -------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def _step_loop(self) -> None:
        in_flight: deque[_InFlight] = deque()
        while True:
            while len(in_flight) < PIPELINE_DEPTH and (plan := self.core.schedule()) is not None:
                in_flight.append(self._send(plan, pipelined=bool(in_flight)))
            self._resolve_done()
            self._wakeup.clear()
            wakeup = asyncio.ensure_future(self._wakeup.wait())
            waits = {wakeup} | ({in_flight[0].call} if in_flight else set())
            # Wake at least every GAUGE_REFRESH_S: Ray drops gauges that are not set for a while.
            await asyncio.wait(waits, timeout=GAUGE_REFRESH_S, return_when=asyncio.FIRST_COMPLETED)
            wakeup.cancel()
            while in_flight and in_flight[0].call.done():
                step = in_flight.popleft()
                try:
                    ok = await self._complete(step)
                except Exception as exc:  # a bug here must not stall every pooled request: fail this step's
                    logger.exception("accounting step %d failed", step.plan.step_id)
                    self.core.fail_plan(step.plan, f"scheduler error: {exc!r}")
                    self._resolve_done()
                    ok = True
                if not ok:  # the group failed: what else was in flight is lost too
                    for lost in in_flight:
                        lost.call.cancel()
                    in_flight.clear()

    def _send(self, plan: StepPlan, pipelined: bool) -> _InFlight:
        self.metrics.plan_bytes.observe(len(pickle.dumps(plan, protocol=5)))
        self.metrics.batch_size.observe(len(plan.scheduled))
        self.metrics.batch_tokens.observe(plan.num_tokens)
        return _InFlight(plan, pipelined, asyncio.ensure_future(self.group.execute(plan)))

    async def _complete(self, step: _InFlight) -> bool:
        """Account one step's result; on a group failure rebuild the group and restart its requests."""
        try:
            result, rank_seconds = step.call.result()
        except Exception as exc:
            logger.exception("step %d failed on the worker group; rebuilding it", step.plan.step_id)
            await self._recover(f"worker group failed: {exc!r}")
            return False
        self.core.postprocess(step.plan, result)
        self._final_latents.update(result.finished)
        self._observe(step, result, rank_seconds)
        self._resolve_done()
        return True

    async def _recover(self, reason: str) -> None:
        seconds = await self.group.rebuild()
        self.metrics.group_restarts.inc()
        lost = [self._waiters[i].new for i in self.core.sent_ids() if i in self._waiters]
        self.core.restart(lost, self.max_restarts, reason)
        logger.warning("worker group rebuilt in %.1f s; %d requests restart from step 0", seconds, len(lost))
        self._resolve_done()

    def _observe(self, step: _InFlight, result: StepResult, rank_seconds: list[float]) -> None:
        m = self.metrics
        if step.plan.scheduled:
            self.core.observe_step(step.plan, max(rank_seconds))
            self.drain_rate.observe(step.plan.num_tokens, max(rank_seconds))
            m.forwards_per_step.observe(result.forwards)
            m.step_shapes.observe(result.shapes)
            m.step_duration.observe(max(rank_seconds))
            if step.pipelined:
                m.step_gap.observe(result.idle_before_seconds)
        for rank, seconds in enumerate(rank_seconds):
            if seconds > 0:  # Ray counters refuse 0
                m.rank_busy_seconds.inc(seconds, tags={"rank": str(rank)})
        if result.ring_bytes:
            m.ring_bytes.inc(result.ring_bytes)
        for rings in step.plan.rings.values():
            for assignment in rings.assignments:
                m.ring_size.observe(assignment.size)
                self._ring_sizes[assignment.size] += 1
        for request_id in result.stepped:
            waiter = self._waiters.get(request_id)
            if waiter is not None:
                waiter.changed.set()

    def _resolve_done(self) -> None:
        for meta in self.core.pop_done():
            latents = self._final_latents.pop(meta.request_id, None)
            self.metrics.requests_finished.inc(tags={"model": meta.model, "status": meta.status.value})
            if meta.first_step_time is not None:
                self.metrics.time_to_first_step.observe(meta.first_step_time - meta.arrival_time,
                                                        tags={"model": meta.model})
            waiter = self._waiters.get(meta.request_id)
            if waiter is not None:
                waiter.result = _result_of(meta, latents)
                waiter.changed.set()
                waiter.finished.set()
        self._final_latents.clear()  # latents of requests cancelled while their last step ran
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.active_requests.set(len(self.core.pool))
        self.metrics.queue_length.set(self.core.num_waiting)


def _result_of(meta: RequestMeta, latents: torch.Tensor | None) -> GenerationResult:
    status, error = meta.status, meta.error
    if status is RequestStatus.FINISHED and latents is None:  # never expected: say so rather than hang
        status, error = RequestStatus.FAILED, "the worker reported the last step without final latents"
    return GenerationResult(request_id=meta.request_id, status=status,
                            latents=latents if status is RequestStatus.FINISHED else None, error=error,
                            arrival_time=meta.arrival_time, first_step_time=meta.first_step_time,
                            finish_time=meta.finish_time, restarts=meta.restarts)
