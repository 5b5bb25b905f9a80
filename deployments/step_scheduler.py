"""StepScheduler: the Serve shell of `engine.StepSchedulerCore`, and the loop that keeps the worker busy.

One `generate()` call per request stays pending while the request is pooled and
answers when it leaves (its final latents come back once, from the step it
finished in). The step loop keeps up to `PIPELINE_DEPTH` plans in flight: plan
k+1 is built and sent while step k runs, so the worker starts the next forward
as soon as it ends the last one (`ray_dit_step_gap_seconds` measures what is left).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections import deque
from dataclasses import dataclass

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import ServeMetrics
from engine.config import SchedulerConfig
from engine.messages import NewRequest, StepPlan, StepResult
from engine.policies import make_policy
from engine.request import GenerationSpec, RequestMeta, RequestStatus
from engine.scheduler import Progress, StepSchedulerCore
from models import load_adapter
from models.base import EncodedPrompt
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

PIPELINE_DEPTH = 2
"""Plans in flight to the worker: the one running and the next one, already planned."""

@dataclass
class GenerationResult:
    """What `generate()` answers when a request leaves the pool."""

    request_id: str
    status: RequestStatus
    latents: torch.Tensor | None  # final latents (1, *latent_shape) when finished
    error: str | None
    arrival_time: float
    first_step_time: float | None
    finish_time: float | None


@dataclass
class _InFlight:
    plan: StepPlan
    pipelined: bool  # sent while another plan was running: requests were waiting on the worker
    call: asyncio.Future


@serve.deployment(max_ongoing_requests=100_000)
class StepScheduler:
    """One async step loop; one pending `generate()` call per pooled request.

    `max_ongoing_requests` is effectively unbounded because every pooled request is an
    ongoing call; admission is bounded by `max_pool_size` instead (PoolFullError).
    """

    def __init__(self, models: list[dict], scheduler: dict, worker: DeploymentHandle) -> None:
        config = SchedulerConfig(**scheduler)
        self.adapters = {s.name: load_adapter(s, parts=()) for s in (ModelSpec(**m) for m in models)}
        self.core = StepSchedulerCore(make_policy(config.policy, config.starvation_timeout_s), config.budget,
                                      config.max_pool_size)
        self.worker = worker
        self.metrics = ServeMetrics()
        self._waiters: dict[str, asyncio.Future[GenerationResult]] = {}
        self._final_latents: dict[str, torch.Tensor] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def generate(self, request_id: str, spec: GenerationSpec, prompt: EncodedPrompt) -> GenerationResult:
        """Admit a request and answer when it leaves the pool (raises engine's PoolFullError when full)."""
        self.core.admit(NewRequest.from_spec(request_id, spec, prompt, self.adapters[spec.model]))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        self._ensure_loop()
        self._wakeup.set()
        self._update_gauges()
        try:
            return await waiter
        except asyncio.CancelledError:  # the caller went away: free the request's slot
            self.core.cancel(request_id)
            self._resolve_done()
            raise

    async def cancel(self, request_id: str) -> bool:
        cancelled = self.core.cancel(request_id)
        self._resolve_done()
        return cancelled

    async def progress(self, request_id: str) -> Progress | None:
        return self.core.progress(request_id)

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
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            wakeup.cancel()
            while in_flight and in_flight[0].call.done():
                self._complete(in_flight.popleft())

    def _send(self, plan: StepPlan, pipelined: bool) -> _InFlight:
        self.metrics.plan_bytes.observe(len(pickle.dumps(plan, protocol=5)))
        self.metrics.batch_size.observe(len(plan.scheduled))
        self.metrics.batch_tokens.observe(plan.num_tokens)
        call = asyncio.ensure_future(self._execute(plan))
        return _InFlight(plan, pipelined, call)

    async def _execute(self, plan: StepPlan) -> StepResult:
        return await self.worker.execute.remote(plan)

    def _complete(self, step: _InFlight) -> None:
        try:
            result = step.call.result()
        except Exception as exc:  # the worker replica died or the call failed: lose this step only
            logger.exception("step %d failed on the worker", step.plan.step_id)
            self.core.fail_plan(step.plan, f"worker failed: {exc!r}")
        else:
            self.core.postprocess(step.plan, result)
            self._final_latents.update(result.finished)
            if step.plan.scheduled:
                self.metrics.forwards_per_step.observe(result.forwards)
                self.metrics.step_shapes.observe(result.shapes)
            self.metrics.step_duration.observe(result.forward_seconds)
            if step.pipelined:
                self.metrics.step_gap.observe(result.idle_before_seconds)
        self._resolve_done()

    def _resolve_done(self) -> None:
        for meta in self.core.pop_done():
            latents = self._final_latents.pop(meta.request_id, None)
            self.metrics.requests_finished.inc(tags={"model": meta.model, "status": meta.status.value})
            if meta.first_step_time is not None:
                self.metrics.time_to_first_step.observe(meta.first_step_time - meta.arrival_time,
                                                        tags={"model": meta.model})
            waiter = self._waiters.pop(meta.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(_result_of(meta, latents))
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
                            finish_time=meta.finish_time)
