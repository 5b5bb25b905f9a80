"""Typed configuration of the step scheduler: policy, step budget, pool size.

Validated once and frozen (vLLM's `SchedulerConfig` style); the simulator builds
the same objects as the Serve shell.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BudgetConfig(_Frozen):
    """What one denoising step may hold (see deployments.step_scheduler)."""

    max_batch_size: int = Field(default=8, ge=1, description="Most requests in one step.")
    max_batch_tokens: int = Field(
        default=65536,
        ge=1,
        description="Most transformer tokens in one step: sum over picked requests of sequence length x "
        "forward rows (2 with classifier-free guidance). A lone request over it still runs.",
    )


class SchedulerConfig(_Frozen):
    policy: Literal["fifo", "srptf"] = "srptf"
    starvation_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="If set, a request not stepped for this long is served before every other "
        "(guards SRPTF against starving long requests under a stream of short ones).",
    )
    budget: BudgetConfig = BudgetConfig()
    max_pool_size: int = Field(
        default=256, ge=1, description="Requests admitted (queued + running); more answer HTTP 429."
    )
