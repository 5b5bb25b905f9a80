"""Brick planner properties (hypothesis): placement, contiguity, balance bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.plan import BrickPlan, RingAssignment
from attention.planner import BrickCostModel, plan_brick, rank_loads

COST = BrickCostModel(min_shard_tokens=64, linear_tokens=96)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(1, 5000), min_size=1, max_size=24), world=st.sampled_from([1, 2, 3, 4, 8]))
def test_every_token_placed_once_in_contiguous_ordered_shards(tokens, world):
    plan = plan_brick(tokens, world, COST)
    assert [a.request for a in plan.assignments] == list(range(len(tokens)))
    for a, n in zip(plan.assignments, tokens):
        assert a.bounds[0] == 0 and a.bounds[-1] == n
        assert all(x <= y for x, y in zip(a.bounds, a.bounds[1:]))  # contiguous, ordered along the ring
        assert max(a.shard_len(j) for j in range(a.size)) - min(a.shard_len(j) for j in range(a.size)) <= 1
        assert a.size in COST.ring_sizes and a.size <= world and len(set(a.ranks)) == a.size
        assert a.size == 1 or n // a.size >= COST.min_shard_tokens
    # Each rank's packed rows cover exactly its shards; all ranks together hold every token once.
    assert sum(plan.local_tokens(r) for r in range(world)) == sum(tokens)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(1, 5000), min_size=1, max_size=24), world=st.sampled_from([2, 4, 8]))
def test_most_loaded_rank_is_within_the_documented_bound(tokens, world):
    plan = plan_brick(tokens, world, COST)
    loads = rank_loads(plan, COST)
    largest_item = max(COST.request_cost(a.tokens) / a.size for a in plan.assignments)
    lower_bound = max(sum(loads) / world, largest_item)
    assert max(loads) <= lower_bound + largest_item + 1e-6


def test_ring_size_follows_the_shard_threshold():
    cost = BrickCostModel(min_shard_tokens=1024)
    assert [cost.ring_size(n, 8) for n in (500, 2047, 2048, 4096, 8191, 8192, 100_000)] == [1, 1, 2, 4, 4, 8, 8]
    assert cost.ring_size(100_000, 4) == 4


def test_one_long_and_many_short_requests_spread_out():
    plan = plan_brick([8192] + [512] * 6, 4, BrickCostModel(min_shard_tokens=1024, linear_tokens=0))
    assert plan.assignments[0].ranks == (0, 1, 2, 3)
    short_ranks = [a.ranks for a in plan.assignments[1:]]
    assert all(len(r) == 1 for r in short_ranks) and len({r[0] for r in short_ranks}) == 4


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="repeats a rank"):
        RingAssignment(0, (1, 1), (0, 2, 4))
    with pytest.raises(ValueError, match="leaves ranks"):
        BrickPlan(2, (RingAssignment(0, (0, 2), (0, 2, 4)),))
    with pytest.raises(ValueError, match="at least one token"):
        plan_brick([4, 0], 2)
