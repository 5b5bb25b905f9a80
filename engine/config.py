"""Typed configuration of the step scheduler: policy, step budget, pool size.

Validated once and frozen (vLLM's `SchedulerConfig` style); the simulator builds
the same objects as the Serve shell.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attention.planner import BrickCostModel
from common.frozen import FrozenModel

AdmissionMode = Literal["step", "step_same_shape", "request", "batch"]
BatchingMode = Literal["cost", "fill"]



class BudgetConfig(FrozenModel):
    """What one denoising step may hold (see engine.scheduler)."""

    max_batch_size: int = Field(default=8, ge=1, description="Most requests in one step.")
    max_batch_tokens: int = Field(
        default=65536,
        ge=1,
        description="Most transformer tokens in one step: sum over picked requests of sequence length x "
        "forward rows (2 with classifier-free guidance). A lone request over it still runs.",
    )


class PlannerConfig(FrozenModel):
    """The Brick planner's cost model (attention.planner.BrickCostModel): which ring each forward row gets."""

    min_shard_tokens: int = Field(
        default=1024, ge=1, description="A row is sharded over r ranks only if every rank keeps at least this many "
        "tokens (1024: where a shard's attention hides the transfer of its next KV block on H100/NVLink).")
    ring_sizes: tuple[int, ...] = Field(default=(1, 2, 4, 8), description="Ring sizes allowed (must include 1).")
    linear_tokens: int = Field(
        default=9216, ge=0, description="Token-wise cost relative to attention: 6 x the model's hidden size.")
    mode: Literal["brick", "fixed"] = Field(
        default="brick", description="'brick': ring size by tokens, per row and step; 'fixed': every row sharded "
        "over `fixed_degree` ranks (fixed-degree sequence parallelism, the xDiT / vLLM-Omni baseline).")
    fixed_degree: int | None = Field(default=None, ge=1, description="Ring size in mode 'fixed' (default: all ranks).")

    def cost_model(self, world_size: int) -> BrickCostModel:
        if self.mode == "fixed":
            degree = min(self.fixed_degree or world_size, world_size)
            return BrickCostModel(1, tuple(sorted({1, degree})), self.linear_tokens)
        return BrickCostModel(self.min_shard_tokens, tuple(self.ring_sizes), self.linear_tokens)


class SchedulerConfig(FrozenModel):
    policy: Literal["fifo", "srptf"] = "srptf"
    starvation_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="If set, a request not stepped for this long is served before every other "
        "(guards SRPTF against starving long requests under a stream of short ones).",
    )
    budget: BudgetConfig = BudgetConfig()
    admission: AdmissionMode = Field(
        default="step", description="'step' (step-level continuous batching), 'step_same_shape', 'request' or "
        "'batch' (run to completion): see engine.admission.")
    batching: BatchingMode = Field(
        default="cost", description="How step admissions form a step: 'cost' adds a request only while the step-time "
        "model learned from the group's measured steps says it lowers the pool's expected total latency (preemptive "
        "SRPT on a saturated device, batching where it has headroom); 'fill' fills the budget greedily (the fixed "
        "batch of vLLM-Omni's step mode and of the first DiT-Serve design). The budget caps either.")
    batch_size: int = Field(default=5, ge=1, description="Requests per run-to-completion batch in admission 'batch'.")
    max_pool_size: int = Field(
        default=256, ge=1, description="Requests admitted (queued + running); more answer HTTP 429."
    )
    planner: PlannerConfig = PlannerConfig()
    max_request_restarts: int = Field(
        default=2, ge=0, description="Times a request may be restarted from step 0 after its worker group failed "
        "before it fails with that reason.")

    @model_validator(mode="after")
    def _batch_fits_budget(self) -> SchedulerConfig:
        if self.admission == "batch" and self.batch_size > self.budget.max_batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds budget.max_batch_size {self.budget.max_batch_size}")
        return self
