"""The engine: the one step loop every driver of `StepSchedulerCore` runs.

    plan = engine.schedule()                  # policy, admission, Brick plans (StepSchedulerCore)
    executed = executor.execute(plan)         # the runners: a worker group, a device thread, a virtual clock
    ended = engine.complete(plan, executed)   # counters, the cost model, outputs of requests that left

The two Serve schedulers (video, diffusion LM) run it with `run()`: up to the executor's
`pipeline_depth` plans in flight (plan k+1 is built and sent while step k runs), a
failed step either restarts the requests whose state the executor lost (a rebuilt worker
group) or fails that step's requests (one device thread). The simulator prices the same
plans on a virtual clock and `cpu_profile` / the engine tests run them on a local runner,
through the same `complete()`. What each shell adds is its own: streaming to callers,
metrics, the start-up probe's inputs.

`EngineCore` keeps what lives beside the pool: each pooled request's `NewRequest` (a lost
group re-admits it from step 0), the outputs of requests that finished, the measured rate
the pool drains at.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Protocol

from engine.config import SchedulerConfig
from engine.messages import NewDllmRequest, NewRequest, StepPlan, StepResult
from engine.request import RequestMeta, RequestStatus
from engine.scheduler import StepSchedulerCore
from engine.step_cost import DrainRate

logger = logging.getLogger(__name__)

IDLE_WAKE_S = 5.0
"""`run()` wakes at least this often with nothing to do, so a shell's gauges stay fresh (Ray drops stale ones)."""


@dataclass(frozen=True)
class Executed:
    """A plan's result and how long each rank was busy with it; the busiest rank's time is the step's."""

    result: StepResult
    rank_seconds: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return max(self.rank_seconds)


@dataclass(frozen=True)
class Ended:
    """A request that left the pool: its final status and, when it finished, its runner's output (final latents or
    response token ids)."""

    meta: RequestMeta
    status: RequestStatus
    output: object | None
    error: str | None


class Executor(Protocol):
    """Runs plans on the model runners (`engine.runner.ModelRunner`, `engine.dllm_runner.DllmRunner`)."""

    pipeline_depth: int
    """Plans in flight: 2 where the runners sit in other processes (the next plan waits on them while the current
    step runs), 1 where `execute` runs on the engine's own device thread."""

    async def execute(self, plan: StepPlan) -> Executed: ...

    async def recover(self, reason: str) -> bool:
        """After `execute` raised: repair the runners; True when their requests' state is gone (every sent request
        restarts from step 0), False when only the failed plan's requests are lost (they fail)."""
        ...


class LocalExecutor:
    """A runner in this process, called inline by `EngineCore.run_local`: the engine tests, `cpu_profile`'s step
    timings and `scheduler_overhead`'s baseline step."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, plan: StepPlan) -> Executed:
        result = self.runner.execute(plan)
        return Executed(result, (result.forward_seconds,))


class StepListener:
    """What a Serve shell does around `run()`'s steps (metrics, streams), called on the loop; a shell subclasses it
    and overrides what it records."""

    def on_sent(self, plan: StepPlan) -> None:
        """`plan` was handed to the executor."""

    def on_step(self, plan: StepPlan, executed: Executed, pipelined: bool) -> None:
        """`plan` ran and was accounted (`pipelined`: it was sent while another plan ran)."""

    def on_ended(self, ended: list[Ended]) -> None:
        """These requests left the pool (finished, failed or cancelled). `run()` also calls it, with whatever ended,
        each time before it waits (at least every `IDLE_WAKE_S`): where a shell refreshes its pool gauges."""

    def on_recovered(self, lost: int, reason: str) -> None:
        """The executor rebuilt its runners: `lost` requests restart from step 0."""


@dataclass
class _InFlight:
    plan: StepPlan
    pipelined: bool  # sent while another plan was running: requests were waiting on the runners
    call: asyncio.Future


class EngineCore:
    def __init__(self, scheduler: StepSchedulerCore, max_restarts: int = 0) -> None:
        self.scheduler = scheduler
        self.max_restarts = max_restarts
        self.drain_rate = DrainRate()
        self._requests: dict[str, NewRequest | NewDllmRequest] = {}  # pooled: what a lost group re-admits
        self._outputs: dict[str, object] = {}  # finished in a step, until their request's end is popped
        self._wakeup: asyncio.Event | None = None

    @classmethod
    def from_config(cls, config: SchedulerConfig, **scheduler) -> "EngineCore":
        return cls(StepSchedulerCore.from_config(config, **scheduler), config.max_request_restarts)

    # ---- requests -----------------------------------------------------------
    def admit(self, request: NewRequest | NewDllmRequest) -> RequestMeta:
        """Pool a request (PoolFullError when full); the loop plans it from its next step on."""
        meta = self.scheduler.admit(request)
        self._requests[request.request_id] = request
        self.wake()
        return meta

    def cancel(self, request_id: str) -> list[Ended]:
        """Drop a pooled request now (its runner state is freed by the next plan)."""
        self.scheduler.cancel(request_id)
        return self.pop_ended()

    def pop_ended(self) -> list[Ended]:
        """Requests that left the pool since the last call, with their outputs."""
        ended = []
        for meta in self.scheduler.pop_done():
            self._requests.pop(meta.request_id, None)
            output = self._outputs.pop(meta.request_id, None)
            status, error = meta.status, meta.error
            if status is RequestStatus.FINISHED and output is None:  # never expected: say so rather than hang
                status, error = RequestStatus.FAILED, "the runner reported the last step without its output"
            ended.append(Ended(meta, status, output if status is RequestStatus.FINISHED else None, error))
        self._outputs.clear()  # outputs of requests cancelled while their last step ran
        return ended

    # ---- the step -----------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        return self.scheduler.schedule()

    def observe(self, plan: StepPlan, seconds: float, skipped_in_step: tuple[str, ...] = ()) -> None:
        """A step of `plan` took `seconds`: what the step-cost model and the drain rate learn from, over the tokens
        that computed (a request whose step cache skipped inside the step left out, as the pool's remaining work
        leaves out the steps it expects to skip)."""
        if plan.scheduled:
            self.scheduler.observe_step(plan, seconds, skipped_in_step)
            skipped = sum(self._requests[i].seq_len * s.rows for s in plan.scheduled
                          if (i := s.request_id) in skipped_in_step and i in self._requests)
            self.drain_rate.observe(plan.num_tokens - skipped, seconds)

    def complete(self, plan: StepPlan, executed: Executed) -> list[Ended]:
        """Account one step: counters, the cost model, finished outputs; the requests that left the pool."""
        self.scheduler.postprocess(plan, executed.result)
        self._outputs.update(executed.result.finished)
        self.observe(plan, executed.seconds, executed.result.skipped_in_step)
        return self.pop_ended()

    def fail(self, plan: StepPlan, reason: str) -> list[Ended]:
        """The whole step was lost: its requests fail, the rest stay pooled."""
        self.scheduler.fail_plan(plan, reason)
        return self.pop_ended()

    def restart_sent(self, reason: str) -> tuple[int, list[Ended]]:
        """The runners lost every request's state: those they held restart from step 0 (or fail past
        `max_restarts`); how many restarted and the requests that left."""
        lost = [self._requests[i] for i in self.scheduler.sent_ids()]
        self.scheduler.restart(lost, self.max_restarts, reason)
        return len(lost), self.pop_ended()

    def seed_cost_model(self, timed: Iterable[tuple[StepPlan, float]]) -> None:
        """The start-up probe's steps (`StepSchedulerCore.probe_plans`, each timed): the cost model's prior."""
        for plan, seconds in timed:
            self.observe(plan, seconds)
        self.scheduler.step_cost.seed()

    def run_local(self, executor: LocalExecutor) -> tuple[StepPlan, Executed, list[Ended]] | None:
        """One step inline (tests, `cpu_profile`): the plan, what ran, the requests that left; None if idle."""
        plan = self.schedule()
        if plan is None:
            return None
        executed = executor.run(plan)
        return plan, executed, self.complete(plan, executed)

    # ---- the Serve shells' loop -----------------------------------------------
    def wake(self) -> None:
        """Something changed (a request joined, ranks were freed): plan again."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self, executor: Executor, listener: StepListener) -> None:
        """Plan, send, complete, forever: up to `executor.pipeline_depth` plans in flight."""
        self._wakeup = asyncio.Event()
        in_flight: deque[_InFlight] = deque()
        while True:
            while len(in_flight) < executor.pipeline_depth and (plan := self.schedule()) is not None:
                listener.on_sent(plan)
                in_flight.append(_InFlight(plan, bool(in_flight), asyncio.ensure_future(executor.execute(plan))))
            listener.on_ended(self.pop_ended())
            self._wakeup.clear()
            wakeup = asyncio.ensure_future(self._wakeup.wait())
            await asyncio.wait({wakeup} | ({in_flight[0].call} if in_flight else set()), timeout=IDLE_WAKE_S,
                               return_when=asyncio.FIRST_COMPLETED)
            wakeup.cancel()
            while in_flight and in_flight[0].call.done():
                step = in_flight.popleft()
                if not await self._account(step, executor, listener):  # the runners' state is gone
                    for lost in in_flight:
                        lost.call.cancel()
                    in_flight.clear()

    async def _account(self, step: _InFlight, executor: Executor, listener: StepListener) -> bool:
        """Complete one step in flight; False when its failure cost the runners every request's state."""
        try:
            executed = step.call.result()
        except Exception as exc:
            logger.exception("step %d failed on the runners", step.plan.step_id)
            reason = f"step failed on the runners: {exc!r}"
            if await executor.recover(reason):
                restarted, ended = self.restart_sent(reason)
                listener.on_recovered(restarted, reason)
                listener.on_ended(ended)
                return False
            listener.on_ended(self.fail(step.plan, reason))
            return True
        try:
            ended = self.complete(step.plan, executed)
            listener.on_step(step.plan, executed, step.pipelined)
        except Exception as exc:  # a bug here must not stall every pooled request: fail this step's requests
            logger.exception("accounting step %d failed", step.plan.step_id)
            ended = self.fail(step.plan, f"scheduler error: {exc!r}")
        listener.on_ended(ended)
        return True
