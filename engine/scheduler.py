"""Step-level continuous batching: the pool, the step budget, and plans that run ahead of results.

`StepSchedulerCore` is plain Python with no Ray and no tensors: it keeps one
`RequestMeta` per pooled request and turns the pool into `StepPlan`s. Every driver
runs it through `engine.engine.EngineCore`, one step reading like a sentence:

    plan = core.schedule()            # policy + budget over the pool
    result = runner.execute(plan)     # one packed forward per model, samplers on the device
    core.postprocess(plan, result)    # counters; finished / failed requests leave

`schedule()` may be called again before the previous plan's result is back: it
assumes in-flight steps succeed (a request's next step index is `steps_scheduled`),
so the worker never waits for the scheduler between two forwards.

How many requests a step holds is the admission's call; under `batching="cost"` it weighs
each candidate with the step-cost model the core learns from `observe_step` (seeded by
`probe_plans`), on the ranks another stage leaves free (`set_busy_ranks`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Collection

from attention.plan import BrickPlan, RingAssignment, even_bounds
from attention.planner import BrickCostModel, plan_brick
from engine.admission import CostRule, Pick, StepAdmission, make_admission
from engine.config import AdmissionMode, BatchingMode, BudgetConfig, SchedulerConfig
from engine.messages import NewDllmRequest, NewRequest, ScheduledStep, StepPlan, StepResult
from engine.policies import FIFOPolicy, SchedulingPolicy, make_policy
from engine.request import RequestMeta, RequestStatus
from engine.run_queue import RunQueue
from engine.step_cost import StepCostModel, busiest_rank_work, plan_work

WORK_MEMO_SIZE = 4096
"""Candidate steps whose busiest-rank work the core remembers (cleared when full)."""


class PoolFullError(RuntimeError):
    """The pool holds `max_pool_size` requests; the caller should shed load (HTTP 429)."""


class StepSchedulerCore:
    def __init__(self, policy: SchedulingPolicy, budget: BudgetConfig, max_pool_size: int = 256,
                 clock: Callable[[], float] = time.time, world_size: int = 1,
                 cost_model: BrickCostModel = BrickCostModel(), one_rank_models: frozenset[str] = frozenset(),
                 admission: AdmissionMode = "step", batch_size: int = 5, batching: BatchingMode = "cost") -> None:
        self.policy = policy
        self.budget = budget
        self.max_pool_size = max_pool_size
        self.clock = clock
        self.world_size = world_size  # ranks of the worker group the plans are for
        self.usable_ranks = world_size
        """Ranks the planner may place step-admitted rows on (the first ones): fewer while another stage holds the
        others' cores (`set_busy_ranks`); run-to-completion batches keep the rings they started on."""
        self.cost_model = cost_model
        self._one_rank = replace(cost_model, ring_sizes=(1,))  # for models whose forward cannot be sharded
        self.one_rank_models = one_rank_models
        self.pool: dict[str, RequestMeta] = {}
        self.queue = RunQueue(policy)  # the pooled requests that still have a step to schedule
        self.step_cost = StepCostModel()  # learned from `observe_step`; until then steps fill the budget
        rule = CostRule(self.expected_step_seconds) if batching == "cost" else None
        self.admission = make_admission(admission, budget, batch_size, world_size, self._demanded_ring, rule,
                                        self._ring_fits)
        self.step_admitted = isinstance(self.admission, StepAdmission)  # else batches keep the rings they started on
        self._unsent: dict[str, NewRequest | NewDllmRequest] = {}  # admitted, not yet handed to the runner
        self._to_free: list[str] = []
        self._done: list[RequestMeta] = []
        self._work_memo: dict[tuple, dict[str, float]] = {}
        self._step_id = 0

    @classmethod
    def from_config(cls, config: SchedulerConfig, world_size: int = 1, one_rank_models: frozenset[str] = frozenset(),
                    clock: Callable[[], float] = time.time) -> "StepSchedulerCore":
        """The core a validated `scheduler` section describes, for a group of `world_size` ranks."""
        return cls(make_policy(config.policy, config.starvation_timeout_s), config.budget, config.max_pool_size,
                   clock=clock, world_size=world_size, cost_model=config.planner.cost_model(world_size),
                   one_rank_models=one_rank_models, admission=config.admission, batch_size=config.batch_size,
                   batching=config.batching)

    # ---- admission / control ------------------------------------------
    def admit(self, request: NewRequest | NewDllmRequest) -> RequestMeta:
        """Add a request to the pool; its message goes to the runner with the first plan that runs it."""
        if len(self.pool) >= self.max_pool_size:
            raise PoolFullError(f"pool is full ({self.max_pool_size} requests); retry later")
        if request.request_id in self.pool:
            raise ValueError(f"request {request.request_id!r} is already in the pool")
        meta = RequestMeta(request_id=request.request_id, model=request.model, seq_len=request.seq_len,
                           rows=request.rows, row_tokens=request.row_tokens, total_steps=request.num_steps,
                           arrival_time=self.clock(), expert_switch_step=request.expert_switch_step,
                           cache=request.cache)
        self.pool[request.request_id] = meta
        self.queue.add(meta)
        self._unsent[request.request_id] = request
        return meta

    def cancel(self, request_id: str) -> bool:
        """Remove a request now; the runner drops its state with the next plan (a step in flight is discarded)."""
        meta = self.pool.get(request_id)
        if meta is None:
            return False
        self._finish(meta, RequestStatus.CANCELLED)
        return True

    def pop_done(self) -> list[RequestMeta]:
        """Requests that left the pool since the last call (finished, failed or cancelled)."""
        done, self._done = self._done, []
        return done

    def remaining_token_steps(self) -> int:
        """The pool's work not yet scheduled: sum of remaining computed steps x tokens per step (CFG rows counted)."""
        return sum(m.remaining_computed_steps * m.seq_len * m.rows for m in self.pool.values())

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in self.pool.values() if r.status is RequestStatus.WAITING)

    # ---- the step -------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        # Every step the admission mode picks from the pool in policy order (engine.admission: by default the
        # budget filled greedily, requests joining and leaving at every step). A request whose every step is
        # already scheduled (its last one in flight) is not a candidate.
        now = self.clock()
        pick = self.admission.pick(self.queue, now) if self.usable_ranks or not self.step_admitted else Pick()
        picked = pick.requests
        if not picked and not self._to_free:
            return None
        new, scheduled = [], []
        tokens = sum(r.step_tokens for r in picked)
        rings = self._rings(picked, pick.ranks)
        for request in picked:
            if not request.sent:
                new.append(self._unsent.pop(request.request_id))
                request.sent = True
            scheduled.append(ScheduledStep(request.request_id, request.steps_scheduled, request.model,
                                           request.next_rows, request.expert_at(request.steps_scheduled)))
            self.queue.discard(request)  # its key changes: out, update, back in (unless its last step is planned)
            request.steps_scheduled += 1
            request.last_scheduled_time = now
            if request.steps_scheduled < request.total_steps:
                self.queue.add(request)
        free, self._to_free = tuple(self._to_free), []
        self._step_id += 1
        return StepPlan(self._step_id, tuple(new), tuple(scheduled), free, tokens, rings)

    def _rings(self, picked: list[RequestMeta], pinned: dict[str, tuple[int, ...]]) -> dict[str, BrickPlan]:
        """The Brick plan of each model's forward: its rows (packed order, CFG rows each) over the group's ranks,
        on the rings the admission pinned (run to completion) or as the planner places them. A request whose next
        step its step cache stands in for has no rows."""
        by_model: dict[str, list[RequestMeta]] = {}
        for request in picked:
            if request.next_rows:
                by_model.setdefault(request.model, []).append(request)
        plans = {}
        for model, requests in by_model.items():
            tokens = [n for r in requests for n in r.row_tokens]
            if not pinned:
                cost = self._one_rank if model in self.one_rank_models else self.cost_model
                plans[model] = plan_brick(tokens, self.world_size, cost, self.usable_ranks)
                continue
            rings = [pinned[r.request_id] for r in requests for _ in r.row_tokens]
            plans[model] = BrickPlan(self.world_size, tuple(
                RingAssignment(i, ring, even_bounds(n, len(ring))) for i, (n, ring) in enumerate(zip(tokens, rings))))
        return plans

    def _ring_fits(self, meta: RequestMeta) -> bool:
        """Whether the request's ring fits the usable ranks. A row always runs on the ring its tokens give it (never
        a smaller one while ranks are busy): a different ring sums its attention in another order, and the same seed
        must give the same bytes."""
        return self.usable_ranks == self.world_size or self._demanded_ring(meta) <= self.usable_ranks

    def set_busy_ranks(self, busy: int) -> None:
        """`busy` ranks' resources are taken by another stage now (VAE decodes sharing their CPU cores): plan
        step-admitted rows on the others (requests whose ring needs more ranks wait); with none left, no step is
        planned until a rank is free again. Jobs in
        their decode are the pool's nearest to completion (their whole remaining work is the decode), so under
        SRPTF they come first."""
        self.usable_ranks = max(0, self.world_size - busy)

    def observe_step(self, plan: StepPlan, seconds: float, skipped_in_step: Collection[str] = ()) -> None:
        """A step ran in `seconds` (the busiest rank's time): what the cost model learns from, over the rows that
        computed (not those of requests whose cache skipped inside the step)."""
        self.step_cost.observe(plan_work(plan, self.cost_model, skipped_in_step), seconds)

    def expected_step_seconds(self, requests: list[RequestMeta]) -> float | None:
        """The cost model's price of one step of `requests`, placed as the Brick planner would place them."""
        return self.step_cost.predict(self._step_work(requests))

    def _step_work(self, requests: list[RequestMeta]) -> dict[str, float]:
        """Each forward's busiest-rank work in a step of `requests`, memoised by their sizes: the cost rule prices
        the same candidate steps at every step (a request's rows keep their tokens), and the placement is pure."""
        key = (self.usable_ranks, tuple((r.model, r.row_tokens if r.next_rows else (), r.expert_at(r.steps_scheduled))
                                        for r in requests))
        work = self._work_memo.get(key)
        if work is None:
            if len(self._work_memo) >= WORK_MEMO_SIZE:
                self._work_memo.clear()
            rows = [(model, len(tokens), expert) for model, tokens, expert in key[1]]
            work = self._work_memo[key] = busiest_rank_work(self._rings(requests, {}), rows, self.cost_model)
        return work

    def probe_plans(self, probes: list[NewRequest]) -> list[StepPlan]:
        """Plans that time one step of each probe request alone and, per model, of all its probes together: the
        start-up probe that seeds the cost model (run them, `observe_step` each, then `step_cost.seed()`). Probe
        requests run one step under their own ids and never enter this pool."""
        by_model: dict[str, list[NewRequest]] = {}
        for request in probes:
            by_model.setdefault(request.model, []).append(request)
        groups = [[r] for r in probes] + [rs for rs in by_model.values() if len(rs) > 1]
        plans = []
        for index, group in enumerate(groups):
            sibling = StepSchedulerCore(FIFOPolicy(), BudgetConfig(max_batch_size=len(group), max_batch_tokens=10**9),
                                        world_size=self.world_size, cost_model=self.cost_model,
                                        one_rank_models=self.one_rank_models, batching="fill")
            for request in group:
                sibling.admit(replace(request, request_id=f"probe-{index}-{request.request_id}", num_steps=1))
            plans.append(sibling.schedule())
        return plans

    def _demanded_ring(self, meta: RequestMeta) -> int:
        """The ring a run-to-completion batch led by `meta` keeps: by its largest row's tokens (or the fixed degree)."""
        if meta.model in self.one_rank_models:
            return 1
        return self.cost_model.ring_size(max(meta.row_tokens), self.world_size)

    def postprocess(self, plan: StepPlan, result: StepResult) -> None:
        """Count the steps that ran; finished and failed requests leave the pool."""
        now = self.clock()
        stepped, skipped_in_step = set(result.stepped), set(result.skipped_in_step)
        for step in plan.scheduled:
            meta = self.pool.get(step.request_id)
            if meta is None:  # cancelled, or failed in an earlier in-flight step
                continue
            if step.request_id in result.errors:
                self._fail(meta, result.errors[step.request_id])
                continue
            if step.request_id not in stepped:
                self._fail(meta, f"step {step.step_index} was not run by the worker")
                continue
            queued = meta.cache.decided_in_step and meta in self.queue  # its key moves with what it computed
            if queued:
                self.queue.discard(meta)
            meta.steps_done += 1
            meta.computed_steps += step.computed and step.request_id not in skipped_in_step
            if queued:
                self.queue.add(meta)
            if meta.first_step_time is None:
                meta.first_step_time = now
                meta.status = RequestStatus.RUNNING
            if meta.steps_done == meta.total_steps or step.request_id in result.finished:
                # A diffusion LM's answer can be final before its last step (`DllmSequence.final`); steps already
                # planned for it are then refused by the runner and ignored here, the request being gone.
                self._finish(meta, RequestStatus.FINISHED, freed_by_runner=True)

    def sent_ids(self) -> list[str]:
        """Pooled requests whose state the runners hold (what a worker-group failure loses)."""
        return [r.request_id for r in self.pool.values() if r.sent]

    def restart(self, requests: list[NewRequest | NewDllmRequest], max_restarts: int, reason: str) -> None:
        """The runners lost these requests' state: run them again from step 0 (same seed, same result),
        or fail those already restarted `max_restarts` times."""
        for new in requests:
            meta = self.pool.get(new.request_id)
            if meta is None:
                continue
            meta.sent = False  # nothing to free: the state is gone
            if meta.restarts >= max_restarts:
                self._fail(meta, f"{reason}; restarted {meta.restarts} times already")
                continue
            self.queue.discard(meta)
            self.admission.reset()
            meta.restarts += 1
            meta.steps_done = meta.steps_scheduled = meta.computed_steps = 0
            meta.status, meta.first_step_time = RequestStatus.WAITING, None
            self.queue.add(meta)
            self._unsent[meta.request_id] = new

    def fail_plan(self, plan: StepPlan, reason: str) -> None:
        """The whole step was lost (e.g. the worker died): fail its requests, keep the rest pooled."""
        self.postprocess(plan, StepResult(step_id=plan.step_id, stepped=(),
                                          errors={s.request_id: reason for s in plan.scheduled}))

    # ---- helpers --------------------------------------------------------
    def _fail(self, meta: RequestMeta, reason: str) -> None:
        meta.error = reason
        self._finish(meta, RequestStatus.FAILED)  # freed by name too: the runner may not know it failed

    def _finish(self, meta: RequestMeta, status: RequestStatus, freed_by_runner: bool = False) -> None:
        meta.status = status
        meta.finish_time = self.clock()
        del self.pool[meta.request_id]
        self.queue.discard(meta)
        self._unsent.pop(meta.request_id, None)
        if meta.sent and not freed_by_runner:
            self._to_free.append(meta.request_id)
        self._done.append(meta)
