"""The step's time as the worker group measures it, learned online: what batch formation weighs.

A packed step costs, per model forward in it, a fixed part (kernel launches, the
sampler steps, the all-gather) plus a part that grows with the busiest rank's work
(`features`: the Brick planner's per-rank cost, attention S² plus the token-wise
layers, over each row's ring). So

    step seconds ≈ Σ_models (fixed_m + per_work_m · busiest-rank work_m)

fitted by least squares over the last `window` steps (ridge-regularised toward the
start-up probe's fit so that a window of same-sized steps, where fixed and per-work
parts are collinear, keeps the probe's split). Whether batching pays follows from
the fit: on a device that one request saturates the fixed part is small and every
added token costs its full share (batching only delays the others); where rows land
on idle ranks, or where the fixed part dominates (small requests on a GPU), an added
request costs little.
"""

from __future__ import annotations

from collections import deque
from typing import Collection, Mapping, Sequence

import numpy as np

from attention.plan import BrickPlan
from attention.planner import BrickCostModel, rank_loads
from engine.messages import StepPlan

RIDGE = 1e-4
"""Weight of the prior (the probe's fit, or zero) against the observations, relative to their scale."""


def forward_key(model: str, expert: int) -> str:
    """The cost model's name of one forward: the model's, or `model#k` for the k-th expert (k >= 1) of a two-expert
    model (Wan 2.2 A14B runs its rows of each expert in that expert's own forward)."""
    return model if expert == 0 else f"{model}#{expert}"


def busiest_rank_work(rings: Mapping[str, BrickPlan], rows: Sequence[tuple[str, int, int]],
                      cost: BrickCostModel, left_out: Collection[int] = ()) -> dict[str, float]:
    """Per forward of a step, its busiest rank's work under the planner's cost model (token units).

    `rows` lists the step's requests in packed order as (model, forward rows, expert): each expert's rows
    are its forward's share of the model's Brick plan (0 rows: a cached step, in no forward). The requests at
    the positions in `left_out` hold their rows in the plan but are not priced (their cache skipped inside the
    step).
    """
    members: dict[tuple[str, int], list[int]] = {}
    at: dict[str, int] = {}
    for k, (model, count, expert) in enumerate(rows):
        start = at.get(model, 0)
        at[model] = start + count
        if count and k not in left_out:
            members.setdefault((model, expert), []).extend(range(start, start + count))
    work = {}
    for (model, expert), indices in members.items():
        plan = rings[model]
        share = plan if len(indices) == len(plan.assignments) else plan.subset(indices)
        work[forward_key(model, expert)] = max(rank_loads(share, cost))
    return work


def plan_work(plan: StepPlan, cost: BrickCostModel, skipped_in_step: Collection[str] = ()) -> dict[str, float]:
    """`busiest_rank_work` of a step as it ran: without the rows of the requests whose step cache skipped their
    blocks inside the step (`StepResult.skipped_in_step`: TeaCache dropped them, FirstBlockCache ran their first
    block only), which the plan still holds."""
    return busiest_rank_work(plan.rings, [(s.model, s.rows, s.expert) for s in plan.scheduled], cost,
                             {k for k, s in enumerate(plan.scheduled) if s.request_id in skipped_in_step})


class StepCostModel:
    """Online least-squares fit of step seconds; `predict` is None until some step of each model was observed."""

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self._observations: deque[tuple[dict[str, float], float]] = deque(maxlen=window)
        self._prior: dict[str, tuple[float, float]] = {}
        self._fit: dict[str, tuple[float, float]] = {}
        self._stale = False

    def observe(self, work: Mapping[str, float], seconds: float) -> None:
        """One step that ran: each forward's busiest-rank work (keys from `forward_key`) and its wall seconds."""
        if seconds <= 0 or not work:
            return
        self._observations.append((dict(work), seconds))
        self._stale = True

    def seed(self) -> None:
        """Make the current fit the prior that later fits are pulled toward (after the start-up probe)."""
        self._refit()
        self._prior = dict(self._fit)

    def coefficients(self, model: str) -> tuple[float, float] | None:
        """(fixed seconds, seconds per unit of busiest-rank work) of `model`'s forward, or None if never seen."""
        if self._stale:
            self._refit()
        return self._fit.get(model)

    def predict(self, work: Mapping[str, float]) -> float | None:
        """Expected seconds of a step with this per-model busiest-rank work; None if a model has no fit yet."""
        total = 0.0
        for model, load in work.items():
            coefficients = self.coefficients(model)
            if coefficients is None:
                return None
            total += coefficients[0] + coefficients[1] * load
        return total

    def _refit(self) -> None:
        self._stale = False
        models = sorted({m for work, _ in self._observations for m in work} | set(self._prior))
        if not models:
            return
        column = {m: i for i, m in enumerate(models)}
        x = np.zeros((len(self._observations), 2 * len(models)))
        for model, i in column.items():  # column-wise: one pass over the window per model
            loads = np.fromiter((work.get(model, -1.0) for work, _ in self._observations), float, len(x))
            x[:, 2 * i], x[:, 2 * i + 1] = loads >= 0, np.maximum(loads, 0.0)
        y = np.fromiter((seconds for _, seconds in self._observations), float, len(self._observations))
        # Columns are scaled to unit size so that the ridge weighs fixed seconds and per-work seconds alike.
        largest = np.abs(x).max(axis=0) if len(x) else np.zeros(2 * len(models))
        scale = np.where(largest > 0, largest, 1.0)
        prior = np.zeros(2 * len(models))
        for model, (fixed, per_work) in self._prior.items():
            prior[2 * column[model]], prior[2 * column[model] + 1] = fixed, per_work
        ridge = RIDGE * max(len(x), 1)
        xs = x / scale
        lhs = xs.T @ xs + ridge * np.eye(xs.shape[1])
        rhs = xs.T @ y + ridge * prior * scale
        theta = np.linalg.solve(lhs, rhs) / scale
        seen = {m for work, _ in self._observations for m in work} | set(self._prior)
        self._fit = {m: (max(0.0, float(theta[2 * column[m]])), max(0.0, float(theta[2 * column[m] + 1])))
                     for m in models if m in seen}


SMOOTHING = 0.2
"""Weight of the newest step in the measured token-steps per second (an exponential moving average)."""


class DrainRate:
    """Token-steps per second over the steps run so far (None before the first)."""

    def __init__(self) -> None:
        self.token_steps_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate, previous = tokens / seconds, self.token_steps_per_s
        self.token_steps_per_s = rate if previous is None else SMOOTHING * rate + (1 - SMOOTHING) * previous

    def load(self, remaining_token_steps: int) -> dict:
        """What a scheduler's `load()` answers: the pool's remaining work and the rate it drains at."""
        return {"remaining_token_steps": remaining_token_steps, "token_steps_per_second": self.token_steps_per_s}
