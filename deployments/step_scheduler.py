"""Step-level continuous batching: the pool, the step budget and the step loop.

`StepSchedulerCore` is plain Python (no Ray): tests and the benchmark simulator
drive it directly. `StepScheduler` is its thin Serve shell, which owns the async
step loop and answers one `generate()` call per request when it leaves the pool.

One step reads like a sentence:

    plan = core.schedule()            # pick requests under the budget
    out = await worker.execute(plan)  # one batched transformer forward (+ CFG)
    core.postprocess(plan, out)       # per-request sampler.step(); finished ones leave
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batch_plan import BatchPlan, StepOutput, SubBatch
from deployments.metrics import ServeMetrics
from deployments.models import load_adapter
from deployments.models.base import DiffusionAdapter, EncodedPrompt
from deployments.policies import SchedulingPolicy, make_policy
from deployments.request import GenerationSpec, RequestState, RequestStatus
from serve_graph.config import BudgetConfig, ModelSpec, SchedulerConfig

logger = logging.getLogger(__name__)


class PoolFullError(RuntimeError):
    """The pool holds `max_pool_size` requests; the caller should shed load (HTTP 429)."""


@dataclass
class GenerationResult:
    """What `generate()` answers when a request leaves the pool."""

    request_id: str
    status: RequestStatus
    latents: torch.Tensor | None
    error: str | None
    arrival_time: float
    first_step_time: float | None
    finish_time: float | None


@dataclass(frozen=True)
class Progress:
    status: RequestStatus
    steps_done: int
    total_steps: int
    first_step_time: float | None


class StepSchedulerCore:
    def __init__(
        self,
        adapters: Mapping[str, DiffusionAdapter],
        policy: SchedulingPolicy,
        budget: BudgetConfig,
        max_pool_size: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.adapters = adapters
        self.policy = policy
        self.budget = budget
        self.max_pool_size = max_pool_size
        self.clock = clock
        self.pool: dict[str, RequestState] = {}
        self._in_flight: set[str] = set()
        self._done: list[RequestState] = []
        self._step_id = 0

    # ---- admission / control ------------------------------------------
    def admit(self, spec: GenerationSpec, prompt: EncodedPrompt) -> RequestState:
        """Create the request's sampler and seeded latents and add it to the pool."""
        if len(self.pool) >= self.max_pool_size:
            raise PoolFullError(f"pool is full ({self.max_pool_size} requests); retry later")
        if spec.request_id in self.pool:
            raise ValueError(f"request {spec.request_id!r} is already in the pool")
        adapter = self.adapters[spec.model]
        shape = adapter.latent_shape(spec.height, spec.width, spec.num_frames)
        sampler = adapter.new_sampler(spec.num_inference_steps, shape)
        state = RequestState(
            spec=spec,
            latents=adapter.initial_latents(shape, spec.seed, sampler),
            sampler=sampler,
            prompt=prompt,
            seq_len=adapter.geometry.seq_len(spec.height, spec.width, spec.num_frames),
            total_steps=len(sampler.timesteps),
            arrival_time=self.clock(),
        )
        self.pool[spec.request_id] = state
        return state

    def cancel(self, request_id: str) -> bool:
        """Cancel a pooled request. It leaves at the next step boundary: now if no step holds it."""
        state = self.pool.get(request_id)
        if state is None:
            return False
        state.cancel_requested = True
        if request_id not in self._in_flight:
            self._finish(state, RequestStatus.CANCELLED)
        return True

    def progress(self, request_id: str) -> Progress | None:
        state = self.pool.get(request_id)
        if state is None:
            return None
        return Progress(state.status, state.steps_done, state.total_steps, state.first_step_time)

    def pop_done(self) -> list[RequestState]:
        """Requests that left the pool since the last call (finished, failed or cancelled)."""
        done, self._done = self._done, []
        return done

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in self.pool.values() if r.status is RequestStatus.WAITING)

    # ---- the step -------------------------------------------------------
    def schedule(self) -> BatchPlan | None:
        # Core idea: every step, rank the whole pool by policy and fill the budget
        # greedily (a request that does not fit is skipped, smaller ones behind it
        # may still fill the step). Requests join the moment they are admitted and
        # leave the moment they finish, so batch membership changes every step. The
        # first request always runs, even if it alone exceeds max_batch_tokens.
        if not self.pool:
            return None
        now = self.clock()
        picked: list[RequestState] = []
        tokens = 0
        for request in self.policy.order(self.pool.values(), now):
            if len(picked) == self.budget.max_batch_size:
                break
            if picked and tokens + request.step_tokens > self.budget.max_batch_tokens:
                continue
            picked.append(request)
            tokens += request.step_tokens
        groups: dict[tuple, list[RequestState]] = defaultdict(list)
        for request in picked:
            request.last_scheduled_time = now
            groups[request.shape_key].append(request)
            self._in_flight.add(request.request_id)
        self._step_id += 1
        return BatchPlan(
            step_id=self._step_id,
            sub_batches=[self._sub_batch(group) for group in groups.values()],
            num_tokens=tokens,
        )

    @staticmethod
    def _sub_batch(group: list[RequestState]) -> SubBatch:
        return SubBatch(
            model=group[0].spec.model,
            request_ids=[r.request_id for r in group],
            latents=[r.model_input for r in group],
            timesteps=[r.current_timestep for r in group],
            prompts=[r.prompt for r in group],
            guidance_scales=[r.spec.guidance_scale for r in group],
        )

    def postprocess(self, plan: BatchPlan, output: StepOutput) -> None:
        """Apply each request's own sampler step; move finished/failed/cancelled requests out."""
        now = self.clock()
        for request_id in plan.request_ids:
            self._in_flight.discard(request_id)
            state = self.pool.get(request_id)
            if state is None:
                continue
            if state.cancel_requested:
                self._finish(state, RequestStatus.CANCELLED)
                continue
            if request_id in output.errors:
                self._fail(state, output.errors[request_id])
                continue
            try:
                adapter = self.adapters[state.spec.model]
                state.latents = adapter.sampler_step(
                    state.sampler, output.predictions[request_id], state.current_timestep, state.latents,
                    state.sampler_extra,
                )
            except Exception as exc:  # a sampler fault fails this request only
                logger.exception("sampler step failed for %s", request_id)
                self._fail(state, f"sampler step failed: {exc!r}")
                continue
            if not torch.isfinite(state.latents).all():
                self._fail(state, f"non-finite latents after step {state.steps_done + 1}")
                continue
            state.steps_done += 1
            if state.first_step_time is None:
                state.first_step_time = now
                state.status = RequestStatus.RUNNING
            if state.remaining_steps == 0:
                self._finish(state, RequestStatus.FINISHED)

    def fail_plan(self, plan: BatchPlan, reason: str) -> None:
        """The whole step was lost (e.g. the worker died): fail its requests, keep the rest pooled."""
        self.postprocess(plan, StepOutput(errors={rid: reason for rid in plan.request_ids}))

    def step(self, execute: Callable[[BatchPlan], StepOutput]) -> BatchPlan | None:
        """Synchronous step for tests and the simulator."""
        plan = self.schedule()
        if plan is not None:
            self.postprocess(plan, execute(plan))
        return plan

    # ---- helpers --------------------------------------------------------
    def _fail(self, state: RequestState, reason: str) -> None:
        state.error = reason
        self._finish(state, RequestStatus.FAILED)

    def _finish(self, state: RequestState, status: RequestStatus) -> None:
        state.status = status
        state.finish_time = self.clock()
        del self.pool[state.request_id]
        self._done.append(state)


def result_of(state: RequestState) -> GenerationResult:
    return GenerationResult(
        request_id=state.request_id,
        status=state.status,
        latents=state.latents if state.status is RequestStatus.FINISHED else None,
        error=state.error,
        arrival_time=state.arrival_time,
        first_step_time=state.first_step_time,
        finish_time=state.finish_time,
    )


@serve.deployment(max_ongoing_requests=100_000)
class StepScheduler:
    """Serve shell of the core: one async step loop; one pending `generate()` call per pooled request.

    `max_ongoing_requests` is effectively unbounded because every pooled request is an
    ongoing call; admission is bounded by `max_pool_size` instead (PoolFullError).
    """

    def __init__(self, models: list[dict], scheduler: dict, worker: DeploymentHandle) -> None:
        config = SchedulerConfig(**scheduler)
        specs = [ModelSpec(**m) for m in models]
        self.core = StepSchedulerCore(
            adapters={s.name: load_adapter(s, parts=()) for s in specs},
            policy=make_policy(config.policy, config.starvation_timeout_s),
            budget=config.budget,
            max_pool_size=config.max_pool_size,
        )
        self.worker = worker
        self.metrics = ServeMetrics()
        self._waiters: dict[str, asyncio.Future[GenerationResult]] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def generate(self, spec: GenerationSpec, prompt: EncodedPrompt) -> GenerationResult:
        """Admit a request and answer when it leaves the pool (raises PoolFullError when full)."""
        self.core.admit(spec, prompt)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[spec.request_id] = waiter
        self._ensure_loop()
        self._wakeup.set()
        self._update_gauges()
        try:
            return await waiter
        except asyncio.CancelledError:  # the caller went away: free the request's slot
            self.core.cancel(spec.request_id)
            self._resolve_done()
            raise

    async def cancel(self, request_id: str) -> bool:
        cancelled = self.core.cancel(request_id)
        self._resolve_done()
        return cancelled

    async def progress(self, request_id: str) -> Progress | None:
        return self.core.progress(request_id)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def _step_loop(self) -> None:
        while True:
            plan = self.core.schedule()
            self._resolve_done()
            if plan is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            start = time.perf_counter()
            try:
                output = await self.worker.execute.remote(plan)
            except Exception as exc:  # the worker replica died or the call failed: lose this step only
                logger.exception("step %d failed on the worker", plan.step_id)
                self.core.fail_plan(plan, f"worker failed: {exc!r}")
            else:
                self.core.postprocess(plan, output)
            self.metrics.step_duration.observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(len(plan.request_ids))
            self.metrics.batch_tokens.observe(plan.num_tokens)
            self._resolve_done()

    def _resolve_done(self) -> None:
        for state in self.core.pop_done():
            model = state.spec.model
            self.metrics.requests_finished.inc(tags={"model": model, "status": state.status.value})
            if state.first_step_time is not None:
                self.metrics.time_to_first_step.observe(state.first_step_time - state.arrival_time,
                                                        tags={"model": model})
            waiter = self._waiters.pop(state.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result_of(state))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.active_requests.set(len(self.core.pool))
        self.metrics.queue_length.set(self.core.num_waiting)
