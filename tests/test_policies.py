"""Policies and the step budget, without Ray and without a transformer (zero predictions)."""

from __future__ import annotations

import pytest

from deployments.models import load_adapter
from deployments.policies import make_policy
from deployments.request import RequestStatus
from deployments.step_scheduler import PoolFullError, StepSchedulerCore
from serve_graph.config import BudgetConfig
from tests.conftest import tiny_spec
from tests.factories import ZeroExecutor, gen_spec, prompt_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture(scope="module")
def adapters():
    return {"cog": load_adapter(tiny_spec("cogvideox", name="cog"), parts=())}


def make_core(adapters, policy="srptf", max_batch_size=8, max_batch_tokens=10**9, starvation=None, pool=256):
    return StepSchedulerCore(adapters, make_policy(policy, starvation),
                             BudgetConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens),
                             max_pool_size=pool, clock=FakeClock())


def test_srptf_orders_by_remaining_steps_times_tokens(adapters):
    core = make_core(adapters, max_batch_size=1)
    long = core.admit(gen_spec("cog", steps=20, height=96, width=160), prompt_for())
    short = core.admit(gen_spec("cog", steps=4, height=32, width=48), prompt_for())
    mid = core.admit(gen_spec("cog", steps=20, height=32, width=48), prompt_for())
    assert long.remaining_cost == 20 * long.seq_len and short.remaining_cost == 4 * short.seq_len
    run = ZeroExecutor()
    while core.pool:
        core.step(run)
    order = [ids[0] for ids in run.steps]
    # Short runs all 4 steps first, then mid, then long: completion order follows L = (T - t) * S.
    assert order[:4] == [short.request_id] * 4
    assert order[4:24] == [mid.request_id] * 20
    assert order[24:] == [long.request_id] * 20


def test_fifo_orders_by_arrival(adapters):
    core = make_core(adapters, policy="fifo", max_batch_size=1)
    first = core.admit(gen_spec("cog", steps=5, height=96, width=160), prompt_for())
    core.admit(gen_spec("cog", steps=2), prompt_for())
    run = ZeroExecutor()
    for _ in range(5):
        core.step(run)
    assert [ids[0] for ids in run.steps] == [first.request_id] * 5


def test_budget_respected_and_requests_join_and_leave_every_step(adapters):
    core = make_core(adapters, max_batch_size=3, max_batch_tokens=10**9)
    run = ZeroExecutor()
    a = core.admit(gen_spec("cog", steps=2), prompt_for())
    b = core.admit(gen_spec("cog", steps=4), prompt_for())
    core.step(run)
    c = core.admit(gen_spec("cog", steps=1), prompt_for())  # joins at the next step
    d = core.admit(gen_spec("cog", steps=3), prompt_for())
    core.step(run)
    core.step(run)
    assert run.steps[0] == [a.request_id, b.request_id]
    assert sorted(run.steps[1]) == sorted([a.request_id, b.request_id, c.request_id])  # size cap 3: d waits
    assert a.status is RequestStatus.FINISHED and c.status is RequestStatus.FINISHED  # left after their last step
    assert d.request_id in run.steps[2] and a.request_id not in run.steps[2]
    assert all(len(ids) <= 3 for ids in run.steps)


def test_token_budget_skips_requests_that_do_not_fit(adapters):
    core = make_core(adapters, max_batch_tokens=1)
    core.admit(gen_spec("cog", steps=3, height=96, width=160), prompt_for())
    core.admit(gen_spec("cog", steps=3, height=32, width=48), prompt_for())
    plan = core.schedule()
    assert len(plan.request_ids) == 1  # the first pick always runs, even over budget; nothing else fits

    core = make_core(adapters, policy="fifo")
    reqs = [core.admit(gen_spec("cog", steps=3, height=h, width=48), prompt_for()) for h in (32, 96, 32)]
    budget = reqs[0].step_tokens + reqs[2].step_tokens
    core.budget = BudgetConfig(max_batch_size=8, max_batch_tokens=budget)
    plan = core.schedule()
    assert plan.num_tokens == budget
    assert plan.request_ids == [reqs[0].request_id, reqs[2].request_id]  # the big one is skipped, not blocking


def test_cancel_leaves_at_step_boundary(adapters):
    core = make_core(adapters)
    run = ZeroExecutor()
    a = core.admit(gen_spec("cog", steps=5), prompt_for())
    b = core.admit(gen_spec("cog", steps=5), prompt_for())
    plan = core.schedule()
    assert core.cancel(a.request_id)  # in flight: stays until this step ends
    assert a.request_id in core.pool
    core.postprocess(plan, run(plan))
    assert a.request_id not in core.pool and a.status is RequestStatus.CANCELLED and a.steps_done == 0
    waiting = core.admit(gen_spec("cog", steps=5), prompt_for())
    assert core.cancel(waiting.request_id) and waiting.request_id not in core.pool  # not in flight: leaves now
    done = {r.request_id: r.status for r in core.pop_done()}
    assert done == {a.request_id: RequestStatus.CANCELLED, waiting.request_id: RequestStatus.CANCELLED}
    assert b.steps_done == 1 and not core.cancel("unknown")


def test_srptf_starves_long_request_without_timeout_and_not_with_it(adapters):
    """Documented behaviour: SRPTF alone lets a stream of short requests starve a long one."""
    for timeout, expect_long_ran in ((None, False), (0.01, True)):
        core = make_core(adapters, max_batch_size=1, starvation=timeout)
        run = ZeroExecutor()
        long = core.admit(gen_spec("cog", steps=50), prompt_for())
        for _ in range(40):  # a new short request arrives every step
            core.admit(gen_spec("cog", steps=1), prompt_for())
            core.step(run)
        assert (long.steps_done > 0) is expect_long_ran


def test_pool_full_is_refused(adapters):
    core = make_core(adapters, pool=2)
    core.admit(gen_spec("cog"), prompt_for())
    core.admit(gen_spec("cog"), prompt_for())
    with pytest.raises(PoolFullError):
        core.admit(gen_spec("cog"), prompt_for())


def test_requests_of_different_shapes_form_separate_sub_batches(adapters):
    core = make_core(adapters)
    core.admit(gen_spec("cog", height=32, width=48), prompt_for())
    core.admit(gen_spec("cog", height=32, width=48), prompt_for(cfg=False))
    core.admit(gen_spec("cog", height=64, width=48), prompt_for())
    plan = core.schedule()
    assert sorted(len(sb.request_ids) for sb in plan.sub_batches) == [1, 2]
    assert sum(sb.rows for sb in plan.sub_batches) == 5  # CFG doubles rows
