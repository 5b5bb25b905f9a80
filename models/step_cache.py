"""A request's step cache: which of its denoising steps run the transformer, and what stands in for the others.

Step caches (TeaCache, FirstBlockCache, MagCache, TaylorSeer) skip the transformer on steps
whose output can be predicted from earlier ones. Every other server applies them to one
request at a time (diffusers' hooks keep one state per module). Here the choice is the
request's own: `StepCache` travels with it from the API to the scheduler and the runner,
so requests with different caches, or none, share a packed step and the forward carries
only the rows that compute.

`taylorseer` (TaylorSeer, https://huggingface.co/papers/2503.06923, as diffusers' lite
variant: the whole transformer skipped, its output extrapolated by a first-order Taylor
series from the steps that computed) decides by step index alone, with diffusers'
`TaylorSeerCacheHook` rule: the first `warmup_steps` steps compute, then one step in
every `interval`. Because the rule needs no tensor, the scheduler knows a request's
computed steps in advance: a cached step holds no row of the step's forward, its Brick
plan or its cost, and SRPTF counts the steps still to compute. A two-expert model (Wan 2.2
A14B) also computes the first step of its second expert, whose output the first expert's
terms cannot predict.

This module holds no tensor and imports no diffusers: the API and the scheduler use it. The
runner's per-request state lives in `models.step_cache_state`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.frozen import FrozenModel

CacheMode = Literal["none", "first_block", "teacache", "magcache", "taylorseer"]
IMPLEMENTED_MODES: tuple[CacheMode, ...] = ("none", "taylorseer")
"""Modes the engine runs today; the others are refused by name (data-dependent modes: issue #33's next stage)."""
DEFAULT_INTERVAL, DEFAULT_WARMUP = 5, 3
"""diffusers' `TaylorSeerCacheConfig` defaults (cache_interval, disable_cache_before_step)."""


class StepCache(FrozenModel):
    """A request's step-cache choice: the `cache` field of /v1/videos and /v1/images/generations, and a served
    model's default (`ModelSpec.cache`)."""

    mode: CacheMode = Field(default="none", description="none (every step computes) or taylorseer.")
    interval: int | None = Field(
        default=None, ge=1, le=20,
        description=f"taylorseer: after the warm-up, one step in every `interval` computes (default "
                    f"{DEFAULT_INTERVAL}; 1 computes every step).")
    warmup_steps: int | None = Field(
        default=None, ge=1, le=200,
        description=f"taylorseer: steps that always compute first (default {DEFAULT_WARMUP}).")

    @model_validator(mode="after")
    def _options_of_the_mode(self) -> "StepCache":
        if self.mode != "taylorseer" and (self.interval is not None or self.warmup_steps is not None):
            raise ValueError(f"interval and warmup_steps apply to mode 'taylorseer' only, not {self.mode!r}")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def computes(self, step: int, expert_switch_step: int | None = None) -> bool:
        """Whether step `step` (0-based) runs the transformer (diffusers' TaylorSeer rule, plus a new expert's
        first step)."""
        if self.mode == "none":
            return True
        warmup = DEFAULT_WARMUP if self.warmup_steps is None else self.warmup_steps
        interval = DEFAULT_INTERVAL if self.interval is None else self.interval
        if step < warmup or step == expert_switch_step:
            return True
        return (step - warmup - 1) % interval == 0

    def computed_steps_from(self, total_steps: int, expert_switch_step: int | None = None) -> tuple[int, ...]:
        """`out[k]`: how many of steps k..total_steps-1 compute (`out[total_steps]` = 0): SRPTF's remaining steps."""
        out = [0] * (total_steps + 1)
        for step in range(total_steps - 1, -1, -1):
            out[step] = out[step + 1] + self.computes(step, expert_switch_step)
        return tuple(out)
