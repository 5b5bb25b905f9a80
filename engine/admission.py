"""How pooled requests enter a step: the admission modes that the evaluation compares on one engine.

- `step` (DiT-Serve): every step is formed from the pool in policy order; with
  batching `cost` (the default) a request joins only while the measured step-cost
  model says it lowers the pool's expected total latency (`CostRule`), with `fill`
  the budget is filled greedily; requests join and leave at every step and the
  Brick planner places each row.
- `step_same_shape` (vLLM-Omni's step mode): step-level too, but one step holds only
  requests of the first pick's shape (same model and tokens per row); the others wait.
- `request` (naive, run to completion): the queue head runs alone to its last step on
  a ring it keeps (sized by its demand, or the fixed degree); heads start on disjoint
  free ranks at the same time; strict FCFS: a head that finds too few free ranks blocks
  those behind it.
- `batch` (naive batching; xDiT / SGLang request-level batching): as `request`, with up
  to `batch_size` requests of identical shape and step count per batch.

A run-to-completion batch keeps its ranks until its last step is planned: plans run in
order on the worker group, so the next batch may start in the very next plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from engine.config import AdmissionMode, BudgetConfig
from engine.request import RequestMeta
from engine.run_queue import RunQueue


@dataclass
class Pick:
    """One step's requests in packed order; `ranks` pins each to a ring (run to completion), else the planner decides."""

    requests: list[RequestMeta] = field(default_factory=list)
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)


class Admission(ABC):
    @abstractmethod
    def pick(self, queue: RunQueue, now: float) -> Pick:
        """The requests of the next step (read-only on the queue: the scheduler updates it)."""

    def reset(self) -> None:
        """The worker group lost every request's state: forget running batches (they restart from step 0)."""


def shape_key(meta: RequestMeta) -> tuple:
    """Requests that a same-shape batcher may put together: same model, same tokens in every forward row."""
    return (meta.model, meta.row_tokens)


StepSeconds = Callable[[list[RequestMeta]], "float | None"]
"""Expected seconds of a step of these requests (the scheduler's learned cost model); None while it knows nothing."""


class CostRule:
    """Whether one more request joins a step: only if it lowers the pool's expected sum of completion times.

    Compared against the step without it, followed by the rest in policy order (what preemptive SRPT would do):
    adding request c at queue position p costs the extra step time Δ to each of the `pooled` requests (every one
    still waits for this step), and saves c's own step later, `alone(c)` seconds that each of the `pooled - p`
    requests from c's position on would have waited for. So c joins iff  Δ · pooled <= alone(c) · (pooled - p)
    (equal only where both are zero: a step the candidate's step cache stands in for adds no forward).
    Linear cost through zero (a saturated device): Δ = alone(c), never worth it, one request per step in policy
    order. Flat cost (idle ranks, launch-bound GPU): Δ ≈ 0, everything batches. Each accepted request lowers the
    expected total, so the chosen step is never worse than the first request alone.
    """

    def __init__(self, step_seconds: StepSeconds) -> None:
        self.step_seconds = step_seconds

    def joins(self, picked: list[RequestMeta], current_s: float, candidate: RequestMeta, position: int,
              pooled: int) -> tuple[bool, float | None]:
        """Whether `candidate` joins, and the step's expected seconds then (None: a model without a fit yet, whose
        requests join as the budget allows)."""
        with_it = self.step_seconds([*picked, candidate])
        alone = self.step_seconds([candidate])
        if with_it is None or alone is None:
            return True, None
        if (with_it - current_s) * pooled <= alone * (pooled - position):  # a cached step (0 = 0) rides along
            return True, with_it
        return False, current_s


class StepAdmission(Admission):
    """Requests in run-queue order join while the budget allows (and, with a cost rule, while each lowers the
    expected total latency); one that does not fit is skipped and ones behind it may still join. The first pick
    always runs, even alone over `max_batch_tokens`. Without a cost rule, or while its model has no fit yet, the
    budget is filled greedily."""

    MAX_REFUSALS = 16
    """Candidates the cost rule may refuse in a row before the step is closed (bounds a step's planning work)."""

    def __init__(self, budget: BudgetConfig, same_shape: bool = False, rule: CostRule | None = None,
                 eligible: Callable[[RequestMeta], bool] | None = None) -> None:
        self.budget, self.same_shape, self.rule = budget, same_shape, rule
        self.eligible = eligible  # whether a request may run now (its ring fits the ranks free of other stages)

    def pick(self, queue: RunQueue, now: float) -> Pick:
        picked: list[RequestMeta] = []
        tokens = refusals = 0
        pooled = len(queue)
        current_s: float | None = None
        for position, request in enumerate(queue.in_order(now)):
            if len(picked) == self.budget.max_batch_size or refusals == self.MAX_REFUSALS:
                break
            if self.eligible is not None and not self.eligible(request):
                continue
            if picked and self.same_shape and shape_key(request) != shape_key(picked[0]):
                continue
            if picked and tokens + request.step_tokens > self.budget.max_batch_tokens:
                continue
            if self.rule is not None:
                if not picked:
                    current_s = self.rule.step_seconds([request])
                elif current_s is not None:
                    joined, current_s = self.rule.joins(picked, current_s, request, position, pooled)
                    if not joined:
                        refusals += 1
                        continue
            picked.append(request)
            tokens += request.step_tokens
        return Pick(picked)


@dataclass
class _Batch:
    requests: list[RequestMeta]
    ranks: tuple[int, ...]


class RunToCompletion(Admission):
    """FCFS batches (of one request, or up to `batch_size` of one shape and step count) that run to their last step
    on a ring each keeps; batches on disjoint ranks run in the same step. `ring_size(meta)` is the ring a batch
    led by `meta` asks for."""

    def __init__(self, budget: BudgetConfig, batch_size: int, world_size: int,
                 ring_size: Callable[[RequestMeta], int]) -> None:
        self.budget, self.batch_size, self.world_size, self.ring_size = budget, batch_size, world_size, ring_size
        self.running: list[_Batch] = []

    def reset(self) -> None:
        self.running = []

    def pick(self, queue: RunQueue, now: float) -> Pick:
        # A batch is over when none of its requests has a step left to plan (finished, in flight, or gone).
        self.running = [b for b in self.running if any(m in queue for m in b.requests)]
        self._start_batches(queue, now)
        pick = Pick()
        for batch in self.running:
            for meta in batch.requests:
                if meta in queue:
                    pick.requests.append(meta)
                    pick.ranks[meta.request_id] = batch.ranks
        return pick

    def _start_batches(self, queue: RunQueue, now: float) -> None:
        busy = {r for b in self.running for r in b.ranks}
        running_ids = {m.request_id for b in self.running for m in b.requests}
        waiting = [m for m in queue.in_order(now) if m.request_id not in running_ids]
        while waiting:
            head = waiting[0]
            members = [m for m in waiting if shape_key(m) == shape_key(head)
                       and m.total_steps == head.total_steps][:self.batch_size]
            free = [r for r in range(self.world_size) if r not in busy]
            size = min(self.ring_size(head), self.world_size)
            if len(free) < size or len(running_ids) + len(members) > self.budget.max_batch_size:
                return  # strict FCFS: the head waits for ranks and so does everyone behind it
            batch = _Batch(members, tuple(free[:size]))
            self.running.append(batch)
            busy.update(batch.ranks)
            running_ids.update(m.request_id for m in members)
            waiting = [m for m in waiting if m.request_id not in running_ids]


def make_admission(mode: AdmissionMode, budget: BudgetConfig, batch_size: int, world_size: int,
                   ring_size: Callable[[RequestMeta], int], rule: CostRule | None = None,
                   eligible: Callable[[RequestMeta], bool] | None = None) -> Admission:
    if mode == "step":
        return StepAdmission(budget, rule=rule, eligible=eligible)
    if mode == "step_same_shape":
        return StepAdmission(budget, same_shape=True, rule=rule, eligible=eligible)
    if mode == "request":
        return RunToCompletion(budget, 1, world_size, ring_size)
    if mode == "batch":
        return RunToCompletion(budget, batch_size, world_size, ring_size)
    raise ValueError(f"unknown admission mode {mode!r}")
