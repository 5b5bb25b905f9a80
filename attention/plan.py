"""Which ranks hold which tokens: the data a ring/Brick attention call and the packed model share.

A step's requests each get a ring (an ordered tuple of ranks) and shard bounds:
ring position j holds tokens bounds[j]:bounds[j+1] of the request, so shards are
contiguous and ordered along the ring. Every rank knows the whole plan, so it can
compute the size of every KV block it will receive without asking.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RingAssignment:
    request: int
    ranks: tuple[int, ...]
    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.ranks) + 1 or self.bounds[0] != 0:
            raise ValueError(f"request {self.request}: bounds {self.bounds} do not fit ring {self.ranks}")
        if any(b > c for b, c in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"request {self.request}: bounds {self.bounds} are not ordered")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"request {self.request}: ring {self.ranks} repeats a rank")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def tokens(self) -> int:
        return self.bounds[-1]

    def shard_len(self, position: int) -> int:
        return self.bounds[position + 1] - self.bounds[position]


@dataclass(frozen=True)
class LocalShard:
    """One request's shard on one rank, at rows start:start+length of the rank's packed tensors."""

    assignment: RingAssignment
    position: int
    start: int
    length: int


@dataclass(frozen=True)
class BrickPlan:
    world_size: int
    assignments: tuple[RingAssignment, ...]

    def __post_init__(self) -> None:
        for a in self.assignments:
            if not all(0 <= r < self.world_size for r in a.ranks):
                raise ValueError(f"request {a.request}: ring {a.ranks} leaves ranks 0..{self.world_size - 1}")

    def local_shards(self, rank: int) -> list[LocalShard]:
        """This rank's shards in plan order; their rows are packed back to back."""
        shards, start = [], 0
        for a in self.assignments:
            if rank in a.ranks:
                position = a.ranks.index(rank)
                shards.append(LocalShard(a, position, start, a.shard_len(position)))
                start += a.shard_len(position)
        return shards

    def local_tokens(self, rank: int) -> int:
        return sum(s.length for s in self.local_shards(rank))

    def subset(self, requests: list[int]) -> "BrickPlan":
        """The plan of only these requests (ascending), renumbered 0..n-1; rings and shards unchanged."""
        by_request = {a.request: a for a in self.assignments}
        return BrickPlan(self.world_size, tuple(RingAssignment(i, by_request[r].ranks, by_request[r].bounds)
                                                for i, r in enumerate(requests)))


def even_bounds(tokens: int, ring_size: int) -> tuple[int, ...]:
    """Split `tokens` into `ring_size` contiguous shards whose lengths differ by at most one."""
    return tuple((tokens * j) // ring_size for j in range(ring_size + 1))


def single_ring_plan(token_counts: list[int], world_size: int) -> BrickPlan:
    """Every request sharded over all ranks in order: classic ring attention."""
    ranks = tuple(range(world_size))
    return BrickPlan(world_size, tuple(RingAssignment(i, ranks, even_bounds(n, world_size))
                                       for i, n in enumerate(token_counts)))
