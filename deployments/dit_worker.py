"""DiTWorker: the Serve shell of one model runner (`engine.runner.ModelRunner`).

The runner keeps every admitted request's latents, sampler and embeddings on this
replica's device, so a replica is stateful: exactly one scheduler drives it, and
plans run in step order (a plan that overtakes its predecessor on the way here
waits for it, at most `ORDER_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio

from ray import serve

from deployments import init_replica
from deployments.metrics import ServeMetrics
from engine.messages import StepPlan, StepResult
from engine.runner import ModelRunner
from models import load_adapter
from models.spec import ModelSpec

ORDER_TIMEOUT_S = 10.0


@serve.deployment(max_ongoing_requests=8)
class DiTWorker:
    """One replica = one worker group (a single rank in this version)."""

    def __init__(self, models: list[dict], resources: dict) -> None:
        res = init_replica(resources)
        specs = [ModelSpec(**m) for m in models]
        self.runner = ModelRunner({s.name: load_adapter(s, parts=("transformer",), device=res.device) for s in specs})
        self.metrics = ServeMetrics()
        self._order = asyncio.Condition()
        self._last_step_id: int | None = None

    async def execute(self, plan: StepPlan) -> StepResult:
        async with self._order:
            try:
                await asyncio.wait_for(self._order.wait_for(lambda: self._in_order(plan)), ORDER_TIMEOUT_S)
            except TimeoutError:  # its predecessor never came (its call failed): run it anyway
                pass
            result = await asyncio.to_thread(self.runner.execute, plan)
            self._last_step_id = plan.step_id
            self._order.notify_all()
        self.metrics.worker_busy_seconds.inc(result.forward_seconds)
        return result

    def _in_order(self, plan: StepPlan) -> bool:
        # A restarted scheduler numbers its steps from 1 again: anything not ahead of us runs.
        return self._last_step_id is None or plan.step_id <= self._last_step_id + 1
