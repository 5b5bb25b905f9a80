"""DiTWorker: holds the transformers and executes one step's BatchPlan.

Each sub-batch (same-shaped requests of one model, at possibly different
timesteps) runs as one transformer forward with classifier-free guidance folded
in. If a sub-batch's forward raises, its requests are retried one by one so that
only the request at fault fails and the others keep their step.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from deployments import init_replica
from deployments.batch_plan import BatchPlan, StepOutput, SubBatch
from deployments.metrics import ServeMetrics
from deployments.models import load_adapter
from serve_graph.config import ModelSpec

logger = logging.getLogger(__name__)


class DiTWorkerCore:
    def __init__(self, models: list[ModelSpec], device: str = "cpu") -> None:
        self.adapters = {m.name: load_adapter(m, parts=("transformer",), device=device) for m in models}

    def execute(self, plan: BatchPlan) -> StepOutput:
        start = time.perf_counter()
        output = StepOutput()
        for sub in plan.sub_batches:
            try:
                output.predictions.update(zip(sub.request_ids, self._predict(sub)))
            except Exception:
                logger.exception("sub-batch forward failed; isolating %d requests", len(sub.request_ids))
                self._isolate(sub, output)
        output.execute_seconds = time.perf_counter() - start
        return output

    def _predict(self, sub: SubBatch) -> list[torch.Tensor]:
        return self.adapters[sub.model].predict(sub.latents, sub.timesteps, sub.prompts, sub.guidance_scales)

    def _isolate(self, sub: SubBatch, output: StepOutput) -> None:
        for i, request_id in enumerate(sub.request_ids):
            alone = SubBatch(sub.model, [request_id], sub.latents[i : i + 1], sub.timesteps[i : i + 1],
                             sub.prompts[i : i + 1], sub.guidance_scales[i : i + 1])
            try:
                output.predictions[request_id] = self._predict(alone)[0]
            except Exception as exc:
                output.errors[request_id] = f"transformer forward failed: {exc!r}"


@serve.deployment(max_ongoing_requests=4)
class DiTWorker:
    """Serve shell: one replica = one worker group (a single rank in this version)."""

    def __init__(self, models: list[dict], resources: dict) -> None:
        res = init_replica(resources)
        self.core = DiTWorkerCore([ModelSpec(**m) for m in models], device=res.device)
        self.metrics = ServeMetrics()

    async def execute(self, plan: BatchPlan) -> StepOutput:
        output = await asyncio.to_thread(self.core.execute, plan)
        self.metrics.worker_busy_seconds.inc(output.execute_seconds)
        return output
