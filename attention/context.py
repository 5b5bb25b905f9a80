"""Attention contexts: which tokens of a packed step this process holds, and how they attend.

A packed DiT forward (`models/*_packed.py`) concatenates the tokens of many
requests into one (rows, hidden) tensor. Everything token-wise runs on all rows
at once; attention runs per request through an `AttentionContext`:

- `LocalAttention`: every request whole in this process, varlen attention;
- `ShardedAttention`: this rank holds the shards a `BrickPlan` gives it, and
  self-attention is Brick Attention over each request's ring.

A `Segment` says which rows hold which tokens of which request; the helpers below
move per-request tensors to rows and back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention.plan import BrickPlan
from attention.ring import CommStats, brick_attention
from attention.varlen import VarlenBackend, offsets, varlen_attention


@dataclass(frozen=True)
class Segment:
    """Rows `row_start:row_start+length` of this process hold tokens `token_start:...` of `request`."""

    request: int
    token_start: int
    length: int
    row_start: int

    @property
    def tokens(self) -> slice:
        return slice(self.token_start, self.token_start + self.length)

    def head(self, leading_tokens: int) -> int:
        """How many of these rows are among the request's first `leading_tokens` tokens."""
        return min(max(leading_tokens - self.token_start, 0), self.length)


class AttentionContext(ABC):
    """Which tokens this process holds, and how their self-attention is computed."""

    backend: str | VarlenBackend

    @abstractmethod
    def segments(self, token_counts: list[int]) -> list[Segment]: ...

    @abstractmethod
    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_counts: list[int],
                       scale: float | None = None) -> torch.Tensor: ...

    @abstractmethod
    def gather_outputs(self, pieces: dict[int, tuple[int, torch.Tensor]], n_requests: int,
                       like: torch.Tensor) -> list[torch.Tensor]:
        """Every request's full output rows, in token order, from this process's `{request: (start, rows)}`."""

    @abstractmethod
    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the processes that share this forward (a per-request decision every rank takes
        alike)."""

    @abstractmethod
    def subset(self, requests: list[int]) -> "AttentionContext":
        """The context of only these requests (ascending), renumbered 0..n-1: one expert's rows of a step."""

    def cross_attention(self, q: torch.Tensor, k: dict[int, torch.Tensor], v: dict[int, torch.Tensor],
                        segments: list[Segment], scale: float | None = None) -> torch.Tensor:
        """Each segment's queries over its request's whole text (text is never sharded)."""
        ks = torch.cat([k[s.request] for s in segments])
        vs = torch.cat([v[s.request] for s in segments])
        out, _ = varlen_attention(q, ks, vs, offsets([s.length for s in segments]),
                                  offsets([len(k[s.request]) for s in segments]), scale, self.backend)
        return out


class LocalAttention(AttentionContext):
    def __init__(self, backend: str | VarlenBackend = "auto") -> None:
        self.backend = backend

    def segments(self, token_counts):
        starts = offsets(token_counts)
        return [Segment(i, 0, n, starts[i]) for i, n in enumerate(token_counts)]

    def self_attention(self, q, k, v, token_counts, scale=None):
        cu = offsets(token_counts)
        out, _ = varlen_attention(q, k, v, cu, cu, scale, self.backend)
        return out

    def gather_outputs(self, pieces, n_requests, like):
        return [pieces[i][1] for i in range(n_requests)]

    def sum_over_ranks(self, values):
        return values

    def subset(self, requests):
        return self


class ShardedAttention(AttentionContext):
    """This rank's shards of a `BrickPlan`; `stats` counts the KV bytes it sends along its rings."""

    def __init__(self, plan: BrickPlan, rank: int, group: dist.ProcessGroup | None = None,
                 backend: str | VarlenBackend = "auto") -> None:
        self.plan, self.rank, self.group, self.backend = plan, rank, group, backend
        self.stats = CommStats()

    def segments(self, token_counts):
        planned = [a.tokens for a in self.plan.assignments]
        if planned != list(token_counts):
            raise ValueError(f"the plan shards {planned} tokens per request, the batch has {list(token_counts)}")
        return [Segment(s.assignment.request, s.assignment.bounds[s.position], s.length, s.start)
                for s in self.plan.local_shards(self.rank)]

    def self_attention(self, q, k, v, token_counts, scale=None):
        return brick_attention(q, k, v, self.plan, self.rank, self.group, scale, self.backend, self.stats)

    def sum_over_ranks(self, values):
        dist.all_reduce(values, group=self.group)
        return values

    def subset(self, requests):
        """The same rings and shards for fewer requests; the KV bytes still count in this context's `stats`."""
        sub = ShardedAttention(self.plan.subset(requests), self.rank, self.group, self.backend)
        sub.stats = self.stats
        return sub

    def gather_outputs(self, pieces, n_requests, like):
        """All-gather every rank's output rows so that each rank holds every request whole.

        Two collectives: each rank's (first token, row count) per request, then its rows,
        padded to the largest rank's count (all_gather needs equal sizes on every backend).
        """
        world = self.plan.world_size
        held = torch.zeros(n_requests, 2, dtype=torch.int64, device=like.device)
        for i, (start, rows) in pieces.items():
            held[i, 0], held[i, 1] = start, len(rows)
        everyone = [torch.empty_like(held) for _ in range(world)]
        dist.all_gather(everyone, held, group=self.group)
        width = like.shape[1:]
        local = torch.cat([pieces[i][1] for i in sorted(pieces)]) if pieces else like.new_empty((0, *width))
        size = max(int(h[:, 1].sum()) for h in everyone)
        padded = like.new_zeros((size, *width))
        padded[:len(local)] = local
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded, group=self.group)
        parts: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(n_requests)}
        for h, buffer in zip(everyone, buffers):
            at = 0
            for i in range(n_requests):
                n = int(h[i, 1])
                if n:
                    parts[i].append((int(h[i, 0]), buffer[at:at + n]))
                    at += n
        return [torch.cat([rows for _, rows in sorted(parts[i], key=lambda piece: piece[0])])
                for i in range(n_requests)]


def gather_rows(per_request: dict[int, torch.Tensor], segments: list[Segment]) -> torch.Tensor:
    """This process's rows of per-request token tensors (tokens first)."""
    return torch.cat([per_request[s.request][s.tokens] for s in segments])


def per_row(per_request: dict[int, torch.Tensor], segments: list[Segment],
            leading: dict[int, tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
    """Repeat a per-request value over that request's rows here; `leading[i] = (n, value)` gives request i's first
    n tokens another value (a conditioning frame's timestep modulation)."""
    leading = leading or {}
    pieces = []
    for s in segments:
        n, first = leading.get(s.request, (0, None))
        head = s.head(n)
        if head:
            pieces.append(first.unsqueeze(0).expand(head, *first.shape))
        if s.length > head:
            value = per_request[s.request]
            pieces.append(value.unsqueeze(0).expand(s.length - head, *value.shape))
    return torch.cat(pieces)


def rows_by_request(rows: torch.Tensor, segments: list[Segment]) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (token_start, rows)} of this process's output, for gathering across ranks."""
    return {s.request: (s.token_start, rows[s.row_start:s.row_start + s.length]) for s in segments}
