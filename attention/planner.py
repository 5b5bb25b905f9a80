"""Brick planner: each request's ring size and ranks for one step, balancing per-rank work.

Cost model (per DiT block, constant factors dropped): a request of S tokens costs
`S^2` for attention plus `linear_tokens * S` for the token-wise layers (QKV/out
projections and the FFN: ~24·S·d² FLOPs against attention's 4·S²·d, equal at
S = 6·d, so `linear_tokens` defaults to 6 × hidden size). Sharded over a ring of r
ranks, every rank of the ring does 1/r of it.

Ring size (documented thresholds): the largest allowed r (1, 2, 4, 8, at most the
worker group size) that leaves every rank at least `min_shard_tokens` tokens. A ring
step computes a shard's queries against one KV block (4·s²·d FLOPs) while the next
block travels (2·s·d·b bytes); the transfer hides when s ≥ F·b / (2·B). For an H100
(F ≈ 400 TFLOP/s bf16, b = 2 bytes, B ≈ 450 GB/s NVLink) that is ~900 tokens, hence
the default 1024. Short requests therefore stay on one rank (no communication at all)
and long ones spread over more ranks.

Placement: longest-processing-time first on the per-rank cost; a request goes to the
r least-loaded ranks (ring in rank order). Guarantee, checked by property tests: the
most loaded rank is at most `max(mean load, largest per-rank item) + largest per-rank
item`, i.e. within 2x of the optimum (both terms are lower bounds of any placement).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from attention.plan import BrickPlan, RingAssignment, even_bounds


@dataclass(frozen=True)
class BrickCostModel:
    min_shard_tokens: int = 1024
    ring_sizes: tuple[int, ...] = (1, 2, 4, 8)
    linear_tokens: int = 9216  # 6 x hidden size of Wan 2.1 1.3B (1536)

    def __post_init__(self) -> None:
        if 1 not in self.ring_sizes or any(r < 1 for r in self.ring_sizes):
            raise ValueError(f"ring_sizes {self.ring_sizes} must be positive and include 1")
        if self.min_shard_tokens < 1:
            raise ValueError("min_shard_tokens must be >= 1")

    def request_cost(self, tokens: int) -> float:
        return float(tokens) * tokens + float(self.linear_tokens) * tokens

    def ring_size(self, tokens: int, world_size: int) -> int:
        fitting = [r for r in self.ring_sizes if r <= world_size and tokens // r >= self.min_shard_tokens]
        return max(fitting, default=1)


def plan_brick(token_counts: list[int], world_size: int, cost: BrickCostModel = BrickCostModel(),
               usable_ranks: int | None = None) -> BrickPlan:
    """Ring size, ranks and contiguous shard bounds of every request of one step, on the group's first
    `usable_ranks` ranks (default: all; fewer where another stage, e.g. a VAE decode, holds the others' cores)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    usable = world_size if usable_ranks is None else usable_ranks
    if not 1 <= usable <= world_size:
        raise ValueError(f"usable_ranks {usable_ranks} outside 1..{world_size}")
    if any(n < 1 for n in token_counts):
        raise ValueError(f"every request needs at least one token, got {token_counts}")
    return _placed(tuple(token_counts), world_size, cost, usable)


@functools.lru_cache(maxsize=4096)
def _placed(token_counts: tuple[int, ...], world_size: int, cost: BrickCostModel, usable: int) -> BrickPlan:
    """`plan_brick`'s placement, memoised: the cost rule prices the same candidate steps over and over (a request's
    rows keep their token counts for all its steps), and a plan is immutable."""
    loads = [0.0] * world_size
    sizes = [cost.ring_size(n, usable) for n in token_counts]
    shares = [cost.request_cost(n) / r for n, r in zip(token_counts, sizes)]  # each ring rank's part
    ranks = range(usable)
    rings: list[tuple[int, ...]] = [()] * len(token_counts)
    for i in sorted(range(len(token_counts)), key=lambda i: (-shares[i], i)):
        if sizes[i] == 1:
            rings[i] = (min(ranks, key=loads.__getitem__),)  # the least loaded; ties go to the lowest rank
        else:
            rings[i] = tuple(sorted(sorted(ranks, key=loads.__getitem__)[:sizes[i]]))
        for r in rings[i]:
            loads[r] += shares[i]
    return BrickPlan(world_size, tuple(RingAssignment(i, rings[i], even_bounds(n, sizes[i]))
                                       for i, n in enumerate(token_counts)))


def rank_loads(plan: BrickPlan, cost: BrickCostModel) -> list[float]:
    """Per-rank cost of a plan under the cost model (what the planner balances)."""
    loads = [0.0] * plan.world_size
    for a in plan.assignments:
        for r in a.ranks:
            loads[r] += cost.request_cost(a.tokens) / a.size
    return loads
