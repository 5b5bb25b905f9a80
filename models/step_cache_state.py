"""The runner's per-request step-cache state: kept beside the request's latents and freed with them.

For `taylorseer` it is diffusers' own `TaylorSeerState` (the Taylor factors of one output and
their update / extrapolation math) over the request's guided prediction: guidance is linear
in the CFG rows and so is the extrapolation, so one state per request stands for both rows
(which therefore decide together). For `magcache` it is the blocks' residual of each CFG row
at the request's last computed step (diffusers keeps one per cache context, cond and uncond).
For `teacache` it is MagCache's residuals plus TeaCache's running decision (the last timestep
modulation and the accumulated rescaled distance), the same on every rank since each computes it
from the same timestep and weights. For `first_block` it is, per CFG row, the first block's and
the other blocks' residuals at the request's last fully computed step (diffusers'
`FBCSharedBlockState`).
Every rank of a Brick group holds every request whole after the all-gather (the residuals
are gathered with the outputs), so each rank's state is the same: replicated like the
latents, no tensor reaching the scheduler.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState

from models.block_caches import BlockCaches, FirstBlockRows
from models.step_cache import StepCache


class TaylorSeerPrediction:
    """First-order Taylor factors of a request's guided prediction over its steps (diffusers' `max_order` 1)."""

    def __init__(self) -> None:
        self._state = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=1)
        self.expert: int | None = None

    def update(self, step: int, expert: int, prediction: torch.Tensor) -> None:
        """A computed step's prediction; a new expert's outputs start the series again."""
        if expert != self.expert:
            self._state.reset()
            self.expert = expert
        self._state.current_step = step
        self._state.update((prediction,))

    def predict(self, step: int, expert: int) -> torch.Tensor:
        """The extrapolated prediction of a cached step."""
        if self._state.last_update_step is None or expert != self.expert:
            raise RuntimeError(f"step {step} is cached but no computed step of expert {expert} precedes it")
        self._state.current_step = step
        return self._state.predict()[0]


class MagCacheResiduals:
    """The blocks' residual (output minus input, all tokens) of each forward row at the last computed step."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] | None = None

    def residuals(self, step: int) -> list[torch.Tensor]:
        """What a skipped step adds to its rows' blocks input."""
        if self.rows is None:
            raise RuntimeError(f"step {step} skips the blocks but no computed step precedes it")
        return self.rows


class TeaCacheResiduals(MagCacheResiduals):
    """MagCache's residuals, and TeaCache's decision over the request's timestep modulations (TeaCache4Wan2.1's
    `accumulated_rel_l1_distance` / `previous_e0`, one state for both CFG rows: they share the timestep)."""

    def __init__(self, threshold: float, warmup_steps: int, coefficients: tuple[float, ...]) -> None:
        super().__init__()
        self.threshold, self.warmup_steps = threshold, warmup_steps
        self.rescale = np.poly1d(coefficients)
        self.previous: torch.Tensor | None = None
        self.accumulated = 0.0

    def computes(self, step: int, modulation: torch.Tensor) -> bool:
        """Whether step `step`, whose timestep modulation is `modulation`, runs the blocks (called once per step)."""
        computes = True
        if step >= self.warmup_steps and self.previous is not None:
            change = ((modulation - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.accumulated += float(self.rescale(change))
            computes = self.accumulated >= self.threshold
        if computes:
            self.accumulated = 0.0
        self.previous = modulation
        return computes


class FirstBlockResiduals:
    """Per forward row, the first block's and the other blocks' residuals at the last step whose blocks all ran."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.head: tuple[torch.Tensor, ...] | None = None
        self.tail: tuple[torch.Tensor, ...] | None = None

    def rows(self, rows: range) -> FirstBlockRows:
        """What the packed forward decides this request's step from (its rows there are `rows`)."""
        return FirstBlockRows(tuple(rows), self.threshold, self.head, self.tail)

    def update(self, rows: range, caches: BlockCaches) -> bool:
        """Keep a computed step's residuals; True when the step skipped the blocks after the first."""
        if rows[0] in caches.skipped:
            return True
        self.head = tuple(caches.head_residual[row] for row in rows)
        self.tail = tuple(caches.tail_residual[row] for row in rows)
        return False


CacheState = TaylorSeerPrediction | MagCacheResiduals | TeaCacheResiduals | FirstBlockResiduals


def new_cache_state(cache: StepCache) -> CacheState | None:
    """The state a request's cache mode keeps on the runner (None for mode none)."""
    if cache.mode == "none":
        return None
    if cache.mode == "taylorseer":
        return TaylorSeerPrediction()
    if cache.mode == "magcache":
        return MagCacheResiduals()
    if cache.mode == "first_block":
        return FirstBlockResiduals(cache.first_block_threshold)
    if cache.mode == "teacache":
        if cache.coefficients is None:
            raise ValueError("a teacache request needs coefficients (the served model's calibration)")
        return TeaCacheResiduals(cache.teacache_threshold, cache.teacache_warmup, cache.coefficients)
    raise ValueError(f"cache mode {cache.mode!r} is not implemented by the runner")
