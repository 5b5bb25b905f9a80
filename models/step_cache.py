"""A request's step cache: which of its denoising steps run the transformer, and what stands in for the others.

Step caches (TeaCache, FirstBlockCache, MagCache, TaylorSeer) skip the transformer on steps
whose output can be predicted from earlier ones. Every other server applies them to one
request at a time (diffusers' hooks keep one state per module). Here the choice is the
request's own: `StepCache` travels with it from the API to the scheduler and the runner,
so requests with different caches, or none, share a packed step and the forward carries
only the rows that compute.

TaylorSeer and MagCache decide by step index alone, so the scheduler knows a request's
computed steps in advance: a cached step holds no row of the step's forward, its Brick
plan or its cost, and SRPTF counts the steps still to compute. FirstBlockCache and
TeaCache decide inside each step, from the step's tensors: their steps all hold rows in the
plan (FirstBlockCache's first block runs for every row; a TeaCache request that skips drops
its rows on the runner) and the runner reports which requests skipped; SRPTF expects the
request's observed fraction of computed steps for the steps to come.

- `taylorseer` (TaylorSeer, https://huggingface.co/papers/2503.06923, as diffusers' lite
  variant: the whole transformer skipped, its output extrapolated by a first-order Taylor
  series from the steps that computed), with diffusers' `TaylorSeerCacheHook` rule: the
  first `warmup_steps` steps compute, then one step in every `interval`. A two-expert
  model (Wan 2.2 A14B) also computes the first step of its second expert, whose output the
  first expert's terms cannot predict.
- `magcache` (MagCache, https://github.com/Zehong-Ma/MagCache, as diffusers' `MagCacheHeadHook`):
  a skipped step runs the embeddings and the output head but not the blocks, whose output is
  their input plus the blocks' residual of the last computed step. Which steps skip follows
  from the checkpoint's calibrated magnitude ratios (`mag_ratios`, one per step of a
  calibration run): the accumulated error of the ratios since the last computed step must
  stay under `threshold` for at most `max_skip_steps` steps, after the first
  `retention_ratio` of the steps. Families whose packed forward can skip the blocks per
  request run it (`DiffusionAdapter.cache_modes`: Wan, CogVideoX, LTX); two-expert models do not.
- `first_block` (FirstBlockCache, https://github.com/chengzeyi/ParaAttention, as diffusers'
  `FBCHeadBlockHook`): the first block runs; if its residual moved by at most `threshold`
  (mean absolute change relative to the one of the request's last fully computed step) the
  other blocks are skipped and their residual of that step stands in (`models.block_caches`).
  Same families as magcache; no calibration.
- `teacache` (TeaCache, https://github.com/ali-vilab/TeaCache, as its TeaCache4Wan2.1): per
  step the relative L1 change of the request's timestep modulation (Wan: the time projection
  `timestep_proj`; CogVideoX: the time embedding), rescaled by the checkpoint's fitted
  polynomial (`coefficients`), accumulates; while the sum stays under `threshold` the step
  skips the blocks as MagCache does (embeddings and head run, the blocks' residual of the last
  computed step stands in), else it computes and the sum restarts. The first `warmup_steps`
  compute. The runner decides as it runs the step (no tensor reaches the scheduler).

This module holds no tensor state: the API and the scheduler use it. The runner's
per-request state lives in `models.step_cache_state`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from common.frozen import FrozenModel

CacheMode = Literal["none", "first_block", "teacache", "magcache", "taylorseer"]
DEFAULT_INTERVAL, DEFAULT_WARMUP = 5, 3
"""diffusers' `TaylorSeerCacheConfig` defaults (cache_interval, disable_cache_before_step)."""
DEFAULT_THRESHOLD, DEFAULT_MAX_SKIP, DEFAULT_RETENTION = 0.06, 3, 0.2
"""diffusers' `MagCacheConfig` defaults (threshold, max_skip_steps, retention_ratio)."""
DEFAULT_FIRST_BLOCK_THRESHOLD = 0.05
"""diffusers' `FirstBlockCacheConfig` default."""
DEFAULT_TEACACHE_THRESHOLD, DEFAULT_TEACACHE_WARMUP = 0.08, 5
"""TeaCache's Wan 2.1 1.3B setting (teacache_thresh 0.08 with its 5 retention steps)."""
_OPTIONS = {"taylorseer": ("interval", "warmup_steps"),
            "magcache": ("threshold", "max_skip_steps", "retention_ratio", "mag_ratios"),
            "first_block": ("threshold",),
            "teacache": ("threshold", "warmup_steps", "coefficients")}


class StepCache(FrozenModel):
    """A request's step-cache choice: the `cache` field of /v1/videos and /v1/images/generations, and a served
    model's default (`ModelSpec.cache`)."""

    mode: CacheMode = Field(default="none",
                            description="none (every step computes), taylorseer, magcache, first_block or teacache.")
    interval: int | None = Field(
        default=None, ge=1, le=20,
        description=f"taylorseer: after the warm-up, one step in every `interval` computes (default "
                    f"{DEFAULT_INTERVAL}; 1 computes every step).")
    warmup_steps: int | None = Field(
        default=None, ge=1, le=200,
        description=f"taylorseer / teacache: steps that always compute first (default {DEFAULT_WARMUP} / "
                    f"{DEFAULT_TEACACHE_WARMUP}).")
    threshold: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description=f"magcache: the accumulated magnitude-ratio error under which the blocks are skipped (default "
                    f"{DEFAULT_THRESHOLD}); first_block: the relative change of the first block's residual under "
                    f"which the other blocks are skipped (default {DEFAULT_FIRST_BLOCK_THRESHOLD}); teacache: the "
                    f"accumulated rescaled change of the timestep modulation under which the blocks are skipped "
                    f"(default {DEFAULT_TEACACHE_THRESHOLD}). Higher skips more.")
    max_skip_steps: int | None = Field(
        default=None, ge=1, le=20,
        description=f"magcache: most consecutive skipped steps (default {DEFAULT_MAX_SKIP}).")
    retention_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description=f"magcache: the fraction of the first steps that always compute (default {DEFAULT_RETENTION}).")
    mag_ratios: tuple[float, ...] | None = Field(
        default=None, min_length=2, max_length=1000,
        description="magcache: the checkpoint's calibrated magnitude ratios, one per step of the calibration run "
                    "(default: the served model's `mag_ratios`; python -m api.cache_calibration --mode magcache prints "
                    "them).")

    coefficients: tuple[float, ...] | None = Field(
        default=None, min_length=2, max_length=8,
        description="teacache: the checkpoint's rescaling polynomial (highest power first, numpy.poly1d) from the "
                    "timestep modulation's relative change to the output's (default: the served model's "
                    "`teacache_coefficients`; python -m api.cache_calibration --mode teacache fits them).")

    @model_validator(mode="after")
    def _options_of_the_mode(self) -> "StepCache":
        allowed = _OPTIONS.get(self.mode, ())
        for name in ("interval", "warmup_steps", "threshold", "max_skip_steps", "retention_ratio", "mag_ratios",
                     "coefficients"):
            if getattr(self, name) is not None and name not in allowed:
                modes = " or ".join(repr(m) for m, options in _OPTIONS.items() if name in options)
                raise ValueError(f"{name} applies to mode {modes} only, not {self.mode!r}")
        if self.mag_ratios is not None and not all(0.0 < r < 100.0 for r in self.mag_ratios):
            raise ValueError("mag_ratios must lie in (0, 100)")
        if self.coefficients is not None and not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError("coefficients must be finite")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def decided_in_step(self) -> bool:
        """Whether the runner decides which steps skip when it runs them (first_block, teacache): not in advance."""
        return self.mode in ("first_block", "teacache")

    @property
    def first_block_threshold(self) -> float:
        return DEFAULT_FIRST_BLOCK_THRESHOLD if self.threshold is None else self.threshold

    @property
    def teacache_threshold(self) -> float:
        return DEFAULT_TEACACHE_THRESHOLD if self.threshold is None else self.threshold

    @property
    def teacache_warmup(self) -> int:
        return DEFAULT_TEACACHE_WARMUP if self.warmup_steps is None else self.warmup_steps

    def schedule(self, total_steps: int, expert_switch_step: int | None = None) -> tuple[bool, ...]:
        """Per step (0-based), whether it holds rows of the step's forward (else the cache stands in). The modes
        decided in the step: every step (first_block's first block always runs; teacache's rows are planned, the
        runner drops them when it skips)."""
        if self.decided_in_step:
            return (True,) * total_steps
        if self.mode == "magcache":
            return self._magcache_schedule(total_steps)
        return tuple(self._taylorseer_computes(step, expert_switch_step) for step in range(total_steps))

    def _taylorseer_computes(self, step: int, expert_switch_step: int | None) -> bool:
        """diffusers' TaylorSeer rule, plus a new expert's first step (mode none: every step)."""
        if self.mode == "none":
            return True
        warmup = DEFAULT_WARMUP if self.warmup_steps is None else self.warmup_steps
        interval = DEFAULT_INTERVAL if self.interval is None else self.interval
        if step < warmup or step == expert_switch_step:
            return True
        return (step - warmup - 1) % interval == 0

    def _magcache_schedule(self, total_steps: int) -> tuple[bool, ...]:
        """`MagCacheHeadHook`'s decisions over a run of `total_steps`, in its float32 arithmetic on the ratios
        interpolated to the run as `MagCacheConfig` does (in numpy: the scheduler's process loads no diffusers)."""
        if self.mag_ratios is None:
            raise ValueError("a magcache schedule needs mag_ratios (the served model's calibration)")
        ratios = interpolate_ratios(np.asarray(self.mag_ratios, dtype=np.float32), total_steps)
        threshold = DEFAULT_THRESHOLD if self.threshold is None else self.threshold
        max_skip = DEFAULT_MAX_SKIP if self.max_skip_steps is None else self.max_skip_steps
        retention = DEFAULT_RETENTION if self.retention_ratio is None else self.retention_ratio
        retention_step = int(retention * total_steps + 0.5)
        out: list[bool] = []
        ratio, steps, error = np.float32(1.0), 0, np.float32(0.0)
        for step in range(total_steps):
            computes = True
            if step >= retention_step:
                ratio = ratio * ratios[step]
                steps += 1
                error = error + abs(1.0 - ratio)
                if any(out) and error <= threshold and steps <= max_skip:
                    computes = False
                else:
                    ratio, steps, error = np.float32(1.0), 0, np.float32(0.0)
            out.append(computes)
        return tuple(out)


def computed_steps_left(schedule: tuple[bool, ...]) -> tuple[int, ...]:
    """`out[k]`: how many of a schedule's steps k.. compute (`out[len(schedule)]` = 0)."""
    out = [0] * (len(schedule) + 1)
    for step in range(len(schedule) - 1, -1, -1):
        out[step] = out[step + 1] + schedule[step]
    return tuple(out)


def interpolate_ratios(ratios: np.ndarray, length: int) -> np.ndarray:
    """diffusers' `mag_cache.nearest_interp` (float32 grid, round half to even): the ratios of a run of `length`."""
    if len(ratios) == length:
        return ratios
    if length == 1:
        return ratios[-1:]
    grid = np.arange(length, dtype=np.float32) * np.float32((len(ratios) - 1) / (length - 1))
    return ratios[np.round(grid).astype(np.int64)]
