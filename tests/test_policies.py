"""Policies, the step budget and the scheduler's bookkeeping, without Ray and without tensors."""

from __future__ import annotations

import pytest

from engine.config import BudgetConfig
from engine.messages import StepPlan, StepResult
from engine.policies import make_policy
from engine.request import RequestStatus
from engine.scheduler import PoolFullError, StepSchedulerCore
from tests.factories import new_request


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def make_core(policy="srptf", max_batch_size=8, max_batch_tokens=10**9, starvation=None, pool=256):
    return StepSchedulerCore(make_policy(policy, starvation),
                             BudgetConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens),
                             max_pool_size=pool, clock=FakeClock())


def step(core: StepSchedulerCore, execute) -> StepPlan | None:
    """One step of the scheduler alone: plan, `execute(plan)` in place of a runner, account."""
    plan = core.schedule()
    if plan is not None:
        core.postprocess(plan, execute(plan))
    return plan


class Recorder:
    """Every scheduled request steps; records each plan's request ids."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def __call__(self, plan):
        self.steps.append(plan.request_ids)
        return StepResult.all_stepped(plan)


def test_srptf_orders_by_remaining_steps_times_tokens():
    core = make_core(max_batch_size=1)
    long = core.admit(new_request(steps=20, seq_len=900))
    short = core.admit(new_request(steps=4, seq_len=100))
    mid = core.admit(new_request(steps=20, seq_len=100))
    assert long.remaining_cost == 20 * 900 and short.remaining_cost == 4 * 100
    run = Recorder()
    while core.pool:
        step(core, run)
    order = [ids[0] for ids in run.steps]
    # Short runs all 4 steps first, then mid, then long: completion order follows L = (T - t) * S.
    assert order[:4] == [short.request_id] * 4
    assert order[4:24] == [mid.request_id] * 20
    assert order[24:] == [long.request_id] * 20


def test_fifo_orders_by_arrival():
    core = make_core(policy="fifo", max_batch_size=1)
    first = core.admit(new_request(steps=5, seq_len=900))
    core.admit(new_request(steps=2))
    run = Recorder()
    for _ in range(5):
        step(core, run)
    assert [ids[0] for ids in run.steps] == [first.request_id] * 5


def test_budget_respected_and_requests_join_and_leave_every_step():
    core = make_core(max_batch_size=3)
    run = Recorder()
    a = core.admit(new_request(steps=2))
    b = core.admit(new_request(steps=4))
    step(core, run)
    c = core.admit(new_request(steps=1))  # joins at the next step
    d = core.admit(new_request(steps=3))
    step(core, run)
    step(core, run)
    assert run.steps[0] == [a.request_id, b.request_id]
    assert sorted(run.steps[1]) == sorted([a.request_id, b.request_id, c.request_id])  # size cap 3: d waits
    assert a.status is RequestStatus.FINISHED and c.status is RequestStatus.FINISHED  # left after their last step
    assert d.request_id in run.steps[2] and a.request_id not in run.steps[2]
    assert all(len(ids) <= 3 for ids in run.steps)


def test_token_budget_skips_requests_that_do_not_fit():
    core = make_core(max_batch_tokens=1)
    core.admit(new_request(steps=3, seq_len=900))
    core.admit(new_request(steps=3, seq_len=100))
    assert len(core.schedule().scheduled) == 1  # the first pick always runs, even over budget; nothing else fits

    core = make_core(policy="fifo", max_batch_tokens=2 * 100 + 2 * 120)  # CFG: 2 rows each
    small, big, other = (core.admit(new_request(steps=3, seq_len=n)) for n in (100, 900, 120))
    plan = core.schedule()
    assert plan.num_tokens == 2 * 100 + 2 * 120
    assert plan.request_ids == [small.request_id, other.request_id]  # the big one is skipped, not blocking
    assert core.admit(new_request(seq_len=50, cfg=False)).step_tokens == 50  # no CFG: one row


def test_plans_run_ahead_of_results_without_double_scheduling_a_last_step():
    """Step k+1 is planned before step k's result: step indices advance, a request's last step is planned once."""
    core = make_core()
    a = core.admit(new_request(steps=2))
    b = core.admit(new_request(steps=3))
    first, second, third = core.schedule(), core.schedule(), core.schedule()
    assert [(s.request_id, s.step_index) for s in first.scheduled] == [(a.request_id, 0), (b.request_id, 0)]
    assert [(s.request_id, s.step_index) for s in second.scheduled] == [(a.request_id, 1), (b.request_id, 1)]
    assert [(s.request_id, s.step_index) for s in third.scheduled] == [(b.request_id, 2)]  # a is done planning
    assert core.schedule() is None
    assert [n.request_id for n in first.new_requests] == [a.request_id, b.request_id] and not second.new_requests
    for plan in (first, second, third):
        core.postprocess(plan, StepResult.all_stepped(plan))
    assert {m.request_id: m.status for m in core.pop_done()} == {a.request_id: RequestStatus.FINISHED,
                                                                  b.request_id: RequestStatus.FINISHED}


def test_failure_in_flight_and_cancel_free_runner_state():
    core = make_core()
    a, b, c = (core.admit(new_request(steps=5)) for _ in range(3))
    first = core.schedule()
    second = core.schedule()  # planned while `first` runs
    core.postprocess(first, StepResult(step_id=first.step_id, stepped=(a.request_id, c.request_id), errors={b.request_id: "boom"}))
    core.postprocess(second, StepResult.all_stepped(second))  # b's pipelined step is ignored: it already failed
    assert b.status is RequestStatus.FAILED and b.error == "boom" and b.steps_done == 0
    assert a.steps_done == 2
    assert core.cancel(c.request_id) and not core.cancel("unknown")
    plan = core.schedule()
    assert set(plan.free) == {b.request_id, c.request_id}  # the runner drops their state with this plan
    assert c.request_id not in plan.request_ids and c.status is RequestStatus.CANCELLED
    waiting = core.admit(new_request())
    assert core.cancel(waiting.request_id)
    assert waiting.request_id not in core.schedule().free  # never sent: nothing to free


def test_a_step_the_worker_did_not_report_fails_its_request():
    core = make_core()
    a = core.admit(new_request(steps=3))
    plan = core.schedule()
    core.postprocess(plan, StepResult(step_id=plan.step_id, stepped=()))
    assert a.status is RequestStatus.FAILED and "not run by the worker" in a.error


def test_srptf_starves_long_request_without_timeout_and_not_with_it():
    """Documented behaviour: SRPTF alone lets a stream of short requests starve a long one."""
    for timeout, expect_long_ran in ((None, False), (0.01, True)):
        core = make_core(max_batch_size=1, starvation=timeout)
        run = Recorder()
        long = core.admit(new_request(steps=50))
        for _ in range(40):  # a new short request arrives every step
            core.admit(new_request(steps=1))
            step(core, run)
        assert (long.steps_done > 0) is expect_long_ran


def test_pool_full_is_refused():
    core = make_core(pool=2)
    core.admit(new_request())
    core.admit(new_request())
    with pytest.raises(PoolFullError):
        core.admit(new_request())


def test_plan_payload_is_ids_and_integers():
    """After admission a step carries ~150 bytes per request, Brick rows included (target: under 1 KB)."""
    import pickle
    import uuid

    core = make_core()
    metas = [core.admit(new_request(steps=50, request_id=f"video_{uuid.uuid4().hex}")) for _ in range(8)]
    core.schedule()  # the admission plan carries the NewRequests
    plan = core.schedule()
    assert not plan.new_requests and len(plan.scheduled) == len(metas)
    per_request = len(pickle.dumps(plan, protocol=5)) / len(metas)
    assert per_request < 1024, per_request


def test_plans_carry_a_brick_plan_per_model_over_its_rows():
    from attention.planner import BrickCostModel

    core = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=2,
                             cost_model=BrickCostModel(min_shard_tokens=100, linear_tokens=0))
    core.admit(new_request(seq_len=1000, model="a"))  # CFG: two rows of 1000 tokens
    core.admit(new_request(seq_len=50, cfg=False, model="a"))
    core.admit(new_request(seq_len=300, model="b"))
    plan = core.schedule()
    assert [(a.tokens, a.size) for a in plan.rings["a"].assignments] == [(1000, 2), (1000, 2), (50, 1)]
    assert [(a.tokens, a.size) for a in plan.rings["b"].assignments] == [(300, 2), (300, 2)]

    core = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=2, one_rank_models=frozenset({"a"}),
                             cost_model=BrickCostModel(min_shard_tokens=100, linear_tokens=0))
    core.admit(new_request(seq_len=1000, model="a"))  # e.g. SD3.5: its forward cannot run sharded
    assert {a.size for a in core.schedule().rings["a"].assignments} == {1}


def test_restart_runs_lost_requests_again_from_step_zero_then_fails_them():
    core = make_core()
    new = new_request(steps=3)
    meta = core.admit(new)
    plan = core.schedule()
    core.postprocess(plan, StepResult.all_stepped(plan))
    assert core.sent_ids() == [new.request_id] and meta.steps_done == 1
    core.restart([new], max_restarts=1, reason="worker group failed")
    assert (meta.steps_done, meta.restarts, meta.status, meta.sent) == (0, 1, RequestStatus.WAITING, False)
    again = core.schedule()
    assert again.new_requests == (new,) and again.scheduled[0].step_index == 0 and not again.free
    core.restart([new], max_restarts=1, reason="worker group failed")
    assert meta.status is RequestStatus.FAILED and meta.error == "worker group failed; restarted 1 times already"


# ---- admission modes (engine.admission) -------------------------------------------------------------------

def _mode_core(admission, world_size=4, batch_size=5, max_batch_size=8, mode="brick"):
    from engine.config import PlannerConfig

    planner = PlannerConfig(min_shard_tokens=100, linear_tokens=0, mode=mode)
    return StepSchedulerCore(make_policy("fifo"), BudgetConfig(max_batch_size=max_batch_size), clock=FakeClock(),
                             world_size=world_size, cost_model=planner.cost_model(world_size), admission=admission,
                             batch_size=batch_size)


def _run(core):
    """Step until the pool is empty; per plan: {request id: ring ranks of its first row}."""
    steps = []
    while core.pool:
        plan = core.schedule()
        rings = {}
        for model, brick in plan.rings.items():
            rows = [s for s in plan.scheduled if s.model == model for _ in range(s.rows)]
            for assignment in brick.assignments:
                rings.setdefault(rows[assignment.request].request_id, assignment.ranks)
        steps.append(rings)
        core.postprocess(plan, StepResult.all_stepped(plan))
    return steps


def test_request_admission_runs_each_request_to_completion_on_its_demanded_ring_fcfs():
    core = _mode_core("request")
    big = core.admit(new_request(steps=2, seq_len=400, cfg=False))  # 400 // 4 >= 100: a 4-rank ring
    small = [core.admit(new_request(steps=3, seq_len=150, cfg=False)) for _ in range(2)]  # 1-rank rings
    steps = _run(core)
    # The big head takes all 4 ranks for its 2 steps; the small ones wait (FCFS), then run side by side on
    # disjoint single ranks until both finish.
    assert steps[:2] == [{big.request_id: (0, 1, 2, 3)}] * 2
    assert steps[2:] == [{small[0].request_id: (0,), small[1].request_id: (1,)}] * 3


def test_request_admission_blocks_behind_a_head_that_finds_too_few_ranks():
    core = _mode_core("request", world_size=2)
    first = core.admit(new_request(steps=3, seq_len=150, cfg=False))  # 1 rank
    head = core.admit(new_request(steps=1, seq_len=400, cfg=False))  # 2 ranks: must wait for `first`
    behind = core.admit(new_request(steps=1, seq_len=150, cfg=False))  # would fit rank 1, but FCFS
    steps = _run(core)
    assert steps[:3] == [{first.request_id: (0,)}] * 3
    assert steps[3] == {head.request_id: (0, 1)} and steps[4] == {behind.request_id: (0,)}


def test_batch_admission_batches_identical_shapes_and_steps_up_to_batch_size():
    core = _mode_core("batch", batch_size=2)
    a = [core.admit(new_request(steps=2, seq_len=400, cfg=False)) for _ in range(3)]
    other_steps = core.admit(new_request(steps=3, seq_len=400, cfg=False))
    steps = _run(core)
    # Two of the three identical requests form the first batch (4-rank ring each row); the third runs alone next,
    # and the one with a different step count is never batched with them.
    assert steps[0] == {a[0].request_id: (0, 1, 2, 3), a[1].request_id: (0, 1, 2, 3)} == steps[1]
    assert steps[2:4] == [{a[2].request_id: (0, 1, 2, 3)}] * 2
    assert steps[4:] == [{other_steps.request_id: (0, 1, 2, 3)}] * 3


def test_step_same_shape_admission_holds_one_shape_per_step():
    core = _mode_core("step_same_shape")
    x1 = core.admit(new_request(steps=2, seq_len=150, cfg=False))
    y = core.admit(new_request(steps=1, seq_len=400, cfg=False))
    x2 = core.admit(new_request(steps=2, seq_len=150, cfg=False))
    steps = _run(core)
    assert [set(s) for s in steps] == [{x1.request_id, x2.request_id}] * 2 + [{y.request_id}]


def test_fixed_degree_planner_shards_every_row_over_all_ranks():
    core = _mode_core("step", mode="fixed")
    ids = [core.admit(new_request(steps=1, seq_len=n, cfg=False)).request_id for n in (150, 400, 30)]
    assert _run(core) == [{i: (0, 1, 2, 3) for i in ids}]
    brick = _mode_core("step")
    ids = [brick.admit(new_request(steps=1, seq_len=n, cfg=False)).request_id for n in (150, 400, 30)]
    assert {i: len(r) for i, r in _run(brick)[0].items()} == dict(zip(ids, (1, 4, 1)))


def test_batch_size_must_fit_the_step_budget():
    from pydantic import ValidationError

    from engine.config import SchedulerConfig

    with pytest.raises(ValidationError, match="batch_size 9 exceeds budget.max_batch_size 8"):
        SchedulerConfig(admission="batch", batch_size=9, budget=BudgetConfig(max_batch_size=8))


def test_remaining_token_steps_is_the_unscheduled_work_of_the_pool():
    core = make_core(max_batch_size=1)
    core.admit(new_request(steps=4, seq_len=100, cfg=True))  # 4 x 200 tokens
    core.admit(new_request(steps=3, seq_len=50, cfg=False))  # 3 x 50
    assert core.remaining_token_steps() == 4 * 200 + 3 * 50
    step(core, StepResult.all_stepped)  # SRPTF runs the smaller one first: one of its steps is done
    assert core.remaining_token_steps() == 4 * 200 + 2 * 50
