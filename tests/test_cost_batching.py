"""Batch formation from the learned step-cost model (engine.step_cost, engine.admission.CostRule), without Ray.

A synthetic device prices each step; the core learns it from `observe_step` as the Serve
shell and the simulator feed it, and forms steps by the cost rule.
"""

from __future__ import annotations

import itertools
import random

import pytest

from attention.planner import BrickCostModel
from engine.config import BudgetConfig
from engine.messages import StepPlan, StepResult
from engine.policies import make_policy
from engine.scheduler import StepSchedulerCore
from engine.step_cost import StepCostModel, plan_work
from tests.factories import new_request

LINEAR_PER_WORK = 1e-6  # seconds per unit of busiest-rank work
ONE_RANK = BrickCostModel(ring_sizes=(1,))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def linear_device(fixed: float):
    """Step seconds = fixed + slope x the busiest rank's work: a device one request saturates (fixed ≈ 0)."""
    return lambda plan: fixed + LINEAR_PER_WORK * sum(plan_work(plan, ONE_RANK).values())


def flat_device(plan: StepPlan) -> float:
    """Every step costs the same whatever it holds: a launch-bound device with headroom."""
    return 0.05


def make_core(max_batch_size: int = 8, batching: str = "cost", world_size: int = 1) -> StepSchedulerCore:
    return StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=max_batch_size), clock=FakeClock(),
                             world_size=world_size, cost_model=ONE_RANK, batching=batching)


def warm_up(core: StepSchedulerCore, device, sizes=(100, 300, 600)) -> None:
    """Teach the cost model the device: steps of one and of two requests of a few sizes (what the probe runs)."""
    for tokens in itertools.chain(([n] for n in sizes), ([a, b] for a, b in itertools.combinations(sizes, 2))):
        plan_core = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=core.world_size,
                                      cost_model=ONE_RANK, batching="fill")
        for n in tokens:
            plan_core.admit(new_request(steps=1, seq_len=n, cfg=False))
        plan = plan_core.schedule()
        core.observe_step(plan, device(plan))


def run(core: StepSchedulerCore, device) -> tuple[list[list[str]], dict[str, float]]:
    """Step the pool empty on `device`; each plan's ids and each request's completion time."""
    clock = core.clock
    steps, done = [], {}
    while core.pool:
        plan = core.schedule()
        seconds = device(plan)
        clock.now += seconds
        core.observe_step(plan, seconds)
        core.postprocess(plan, StepResult.all_stepped(plan))
        steps.append(plan.request_ids)
        done.update((m.request_id, clock.now) for m in core.pop_done())
    return steps, done


def test_cost_model_recovers_a_linear_device():
    model = StepCostModel()
    for work in (1e4, 5e4, 2e5, 7e5):
        model.observe({"cog": work}, 0.01 + 2e-7 * work)
    fixed, per_work = model.coefficients("cog")
    assert fixed == pytest.approx(0.01, rel=0.02) and per_work == pytest.approx(2e-7, rel=0.02)
    assert model.predict({"cog": 1e5}) == pytest.approx(0.03, rel=0.02)
    assert model.predict({"mochi": 1e5}) is None  # never seen: no guess


def test_linear_cost_runs_one_request_per_step_in_srpt_order():
    core = make_core()
    device = linear_device(fixed=0.0)
    warm_up(core, device)
    sizes = {"long": (20, 600), "short": (4, 100), "mid": (10, 300)}
    ids = {name: core.admit(new_request(steps=s, seq_len=n, cfg=False, request_id=name)).request_id
           for name, (s, n) in sizes.items()}
    steps, _ = run(core, device)
    assert all(len(step) == 1 for step in steps)
    assert [s[0] for s in steps] == [ids["short"]] * 4 + [ids["mid"]] * 10 + [ids["long"]] * 20


def test_flat_cost_batches_everything():
    core = make_core()
    warm_up(core, flat_device)
    for n in (100, 200, 300, 400, 500):
        core.admit(new_request(steps=6, seq_len=n, cfg=False))
    steps, _ = run(core, flat_device)
    assert [len(s) for s in steps] == [5] * 6


def test_budget_caps_the_cost_rule():
    core = make_core(max_batch_size=2)
    warm_up(core, flat_device)
    for _ in range(5):
        core.admit(new_request(steps=2, seq_len=100, cfg=False))
    steps, _ = run(core, flat_device)
    assert max(len(s) for s in steps) == 2


def test_idle_ranks_are_free_to_fill():
    """Two ranks, requests too small to shard: a second request lands on the idle rank at no extra time."""
    core = make_core(world_size=2)

    def two_rank_device(plan: StepPlan) -> float:
        return LINEAR_PER_WORK * sum(plan_work(plan, ONE_RANK).values())

    warm_up(core, two_rank_device)
    for _ in range(4):
        core.admit(new_request(steps=3, seq_len=300, cfg=False))
    steps, _ = run(core, two_rank_device)
    assert [len(s) for s in steps] == [2] * 6


def expected_total_latency(core: StepSchedulerCore, batch: list, device) -> float:
    """Sum of completion times of the pool if this step runs `batch`, then every request alone in SRPT order
    (each step priced by the device)."""
    price = lambda requests: device(_plan_of(core, requests))  # noqa: E731
    now = price(batch)
    remaining = {m.request_id: m.remaining_steps - (m in batch) for m in core.queue.in_order(0.0)}
    total = 0.0
    order = sorted(core.queue.in_order(0.0), key=lambda m: remaining[m.request_id] * m.seq_len)
    for meta in order:
        now += remaining[meta.request_id] * price([meta])
        total += now
    return total


def _plan_of(core: StepSchedulerCore, requests) -> StepPlan:
    return StepPlan(0, (), (), (), sum(r.step_tokens for r in requests), core._rings(list(requests), {}))


@pytest.mark.parametrize("seed", range(20))
def test_rule_never_worse_than_srpt_alone(seed):
    rng = random.Random(seed)
    device = linear_device(fixed=rng.choice([0.0, 0.002, 0.02, 0.2]))
    core = make_core(world_size=rng.choice([1, 2]))
    warm_up(core, device)
    for _ in range(rng.randint(2, 10)):
        core.admit(new_request(steps=rng.randint(1, 30), seq_len=rng.choice([100, 300, 600, 1200]), cfg=False))
    picked = core.admission.pick(core.queue, 0.0).requests
    alone = [next(iter(core.queue.in_order(0.0)))]
    assert picked[0] is alone[0]
    assert expected_total_latency(core, picked, device) <= expected_total_latency(core, alone, device) + 1e-9


def test_cost_batching_beats_fill_on_a_saturated_device():
    """Mean completion time of the same pool: the cost rule (SRPT alone) vs a fixed batch of 8 (processor sharing)."""
    device = linear_device(fixed=0.001)
    means = {}
    for batching in ("cost", "fill"):
        core = make_core(batching=batching)
        warm_up(core, device)
        rng = random.Random(3)
        for i in range(8):
            core.admit(new_request(steps=rng.choice([10, 20, 40, 80]), seq_len=rng.choice([300, 600]), cfg=False,
                                   request_id=f"{batching}-{i}"))
        _, done = run(core, device)
        means[batching] = sum(done.values()) / len(done)
    assert means["cost"] < 0.75 * means["fill"]


def test_busy_ranks_leave_the_planner_the_others():
    """While a decode holds one rank's core, steps are planned on the other rank only; none while all are held."""
    core = StepSchedulerCore(make_policy("srptf"), BudgetConfig(), world_size=2, batching="fill",
                             cost_model=BrickCostModel(min_shard_tokens=100, ring_sizes=(1, 2)))
    small = core.admit(new_request(steps=3, seq_len=150))  # rows of 150 tokens: one rank each
    large = core.admit(new_request(steps=3, seq_len=400))  # rows of 400 tokens: sharded over both ranks
    core.set_busy_ranks(1)
    busy_plan = core.schedule()  # the large request keeps its 2-rank ring: it waits, the small one runs on rank 0
    assert busy_plan.request_ids == [small.request_id]
    assert {r for a in busy_plan.rings["cog"].assignments for r in a.ranks} == {0}
    core.set_busy_ranks(5)  # every core decoding: no step until one is free
    assert core.usable_ranks == 0 and core.schedule() is None
    core.set_busy_ranks(0)
    free_plan = core.schedule()
    assert large.request_id in free_plan.request_ids
    assert {r for a in free_plan.rings["cog"].assignments for r in a.ranks} == {0, 1}


def test_ordering_bound_preempts_a_long_job_for_a_short_one():
    from benchmarks.end_to_end import single_server_means

    # FCFS: the short job waits the long one out (10 s + 10 s); SRPT: it preempts at t=1 (1 s + 11 s).
    assert single_server_means([(0.0, 10.0), (1.0, 1.0)]) == pytest.approx((10.0, 6.0))
    # An idle server between arrivals: both orders are the service times.
    assert single_server_means([(5.0, 1.0), (0.0, 2.0)]) == pytest.approx((1.5, 1.5))
    # Same sizes: nothing to reorder.
    fcfs, srpt = single_server_means([(0.0, 3.0), (0.5, 3.0), (1.0, 3.0)])
    assert fcfs == pytest.approx(srpt) == pytest.approx((3.0 + 5.5 + 8.0) / 3)


def test_rows_skipped_inside_the_step_are_not_priced():
    """A step in which a FirstBlockCache or TeaCache request skipped its blocks is learnt over the rows that
    computed: its work is that of the same step planned without that request, whichever position it held."""
    for skipped in ("a", "b", "c"):
        full = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=2, cost_model=BrickCostModel(),
                                 batching="fill")
        without = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=2, cost_model=BrickCostModel(),
                                    batching="fill")
        for request_id, seq_len in (("a", 4000), ("b", 300), ("c", 9000)):
            full.admit(new_request(steps=2, seq_len=seq_len, request_id=request_id))
            if request_id != skipped:
                without.admit(new_request(steps=2, seq_len=seq_len, request_id=request_id))
        plan, reference = full.schedule(), without.schedule()
        ran = plan_work(plan, BrickCostModel(), (skipped,))
        assert ran == plan_work(reference, BrickCostModel())
        assert sum(ran.values()) < sum(plan_work(plan, BrickCostModel()).values())
