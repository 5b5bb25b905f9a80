"""Step caches that work inside the transformer's blocks, per row of a packed forward.

Three modes act on a row's blocks rather than on its whole step:

- `magcache` and `teacache`: the rows of a computed step keep their blocks' residual (output
  minus input), which the request's skipped steps add back (`models.step_cache_state`); which
  steps skip is decided outside the forward.
- `first_block` (FirstBlockCache, as diffusers' `FBCHeadBlockHook` / `FBCBlockHook`): the first
  block runs for every row; a request whose first-block residual moved, relative to the one of
  its last fully computed step, by no more than its threshold (mean |now - then| / mean |then|)
  skips the other blocks, whose output is then the first block's plus the other blocks'
  residual of that step. The decision is the request's own, taken from its rows alone: CFG rows
  pool their sums and decide together; on a Brick group each rank sums the tokens it holds and
  the sums are all-reduced, so every rank decides alike. The rows that compute run the other
  blocks as a packed forward of their own (the same rings, fewer rows).

A `BlockCaches` goes into one packed forward: it says which rows keep what, and the forward
fills it (`run_blocks`); `models.packed.forward_packed` then all-gathers what was kept so that
every rank holds it whole, like the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attention.context import AttentionContext, Segment


@dataclass(frozen=True)
class FirstBlockRows:
    """One FirstBlockCache request's rows in a forward and its residuals from its last fully computed step."""

    rows: tuple[int, ...]  # its forward rows ([uncond, cond] with CFG): they decide together
    threshold: float
    head: tuple[torch.Tensor, ...] | None  # per row, the first block's residual (all tokens); None: none computed yet
    tail: tuple[torch.Tensor, ...] | None  # per row, the other blocks' residual at that step


@dataclass
class BlockCaches:
    """What one packed forward keeps for the block-level step caches of its rows, and what it decided."""

    keep: list[int] = field(default_factory=list)  # MagCache / TeaCache rows: their blocks' residual is kept
    first_block: list[FirstBlockRows] = field(default_factory=list)
    # Filled by the forward with this process's (first token, rows), then by `models.packed` with whole tensors:
    blocks_residual: dict = field(default_factory=dict)  # keep row -> blocks' output minus input
    head_residual: dict = field(default_factory=dict)  # computed first_block row -> first block's residual
    tail_residual: dict = field(default_factory=dict)  # computed first_block row -> the other blocks' residual
    skipped: set[int] = field(default_factory=set)  # first_block rows that skipped the blocks after the first

    @property
    def probed_rows(self) -> list[int]:
        return [row for request in self.first_block for row in request.rows]

    @property
    def computed_probed_rows(self) -> list[int]:
        """First-block rows that ran every block (ascending): whose residuals are kept."""
        return sorted(row for row in self.probed_rows if row not in self.skipped)

    def decide(self, head: dict[int, tuple[int, torch.Tensor]], ctx: AttentionContext, device: torch.device,
               measured: dict[int, torch.Tensor] | None = None) -> None:
        """Which first_block rows skip the other blocks (into `skipped`), from the first block's residual on this
        process's tokens of each probed row (`head`: row -> (first token, rows); `measured`: per row, the tokens the
        distance is taken over, e.g. video but not text tokens). Every rank of a group calls it, holding tokens of
        the batch or not: the sums are all-reduced."""
        sums = torch.zeros(len(self.probed_rows), 2, dtype=torch.float32, device=device)
        k = 0
        for request in self.first_block:
            for j, row in enumerate(request.rows):
                if row in head and request.head is not None:
                    start, now = head[row]
                    then = request.head[j][start:start + len(now)].float()
                    now = now.float()
                    if measured is not None:
                        now, then = now[measured[row]], then[measured[row]]
                    sums[k, 0], sums[k, 1] = (now - then).abs().sum(), then.abs().sum()
                k += 1
        sums = ctx.sum_over_ranks(sums)
        k = 0
        for request in self.first_block:
            moved, size = sums[k:k + len(request.rows)].sum(dim=0).tolist()
            k += len(request.rows)
            if request.head is not None and size > 0 and moved / size <= request.threshold:
                self.skipped.update(request.rows)


@dataclass(frozen=True)
class RowSubset:
    """The part of a packed forward that belongs to some of its rows: what the blocks after the first run on when
    other rows skip them."""

    rows: list[int]  # the forward rows kept, ascending; a family renumbers its per-row dicts by position here
    index: torch.Tensor  # this process's token rows that belong to them
    segments: list[Segment]  # their segments, renumbered and packed back to back

    def of_rows(self, per_row: dict) -> dict:
        """A {forward row: value} dict of this process, renumbered to the subset's rows."""
        return {j: per_row[i] for j, i in enumerate(self.rows) if i in per_row}

    def of_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's token rows of the subset, from a tensor over all its token rows."""
        return rows.index_select(0, self.index)


def row_subset(segments: list[Segment], rows: list[int], device: torch.device) -> RowSubset:
    position = {row: i for i, row in enumerate(rows)}
    kept = [s for s in segments if s.request in position]
    index = torch.cat([torch.arange(s.row_start, s.row_start + s.length) for s in kept]) if kept \
        else torch.zeros(0, dtype=torch.long)
    renumbered, at = [], 0
    for s in kept:
        renumbered.append(Segment(position[s.request], s.token_start, s.length, at))
        at += s.length
    return RowSubset(rows, index.to(device), renumbered)


FirstBlock = Callable[[torch.Tensor], torch.Tensor]
OtherBlocks = Callable[[torch.Tensor, RowSubset | None], torch.Tensor]


def run_blocks(x: torch.Tensor, segments: list[Segment], n_rows: int, ctx: AttentionContext,
               caches: BlockCaches | None, first_block: FirstBlock, other_blocks: OtherBlocks,
               measured: torch.Tensor | None = None) -> torch.Tensor:
    """A family's blocks over this process's token rows `x` (of `n_rows` forward rows), filling `caches`.

    `first_block(x)` runs the first block; `other_blocks(x, subset)` the rest, on all rows (subset None) or on
    the rows of `subset` only (x then holds only those token rows).
    """
    if caches is None or not (caches.keep or caches.first_block):
        return other_blocks(first_block(x), None)
    blocks_input = x
    x = first_block(x)
    if caches.first_block:
        head = _residual_pieces(x, blocks_input, segments, set(caches.probed_rows))
        masks = None if measured is None else {s.request: measured[_rows(s)] for s in segments if s.request in head}
        caches.decide(head, ctx, x.device, masks)
        out = _other_blocks_of_computing_rows(x, segments, n_rows, ctx, caches, other_blocks)
        computed = set(caches.computed_probed_rows)
        caches.head_residual = {row: piece for row, piece in head.items() if row in computed}
        caches.tail_residual = _residual_pieces(out, x, segments, computed)
    else:
        out = other_blocks(x, None)
    if caches.keep:
        caches.blocks_residual = _residual_pieces(out, blocks_input, segments, set(caches.keep))
    return out


def _rows(segment: Segment) -> slice:
    """A segment's rows of this process's token tensors."""
    return slice(segment.row_start, segment.row_start + segment.length)


def _residual_pieces(after: torch.Tensor, before: torch.Tensor, segments: list[Segment], rows: set[int],
                     ) -> dict[int, tuple[int, torch.Tensor]]:
    """{row: (first token, after - before)} over this process's tokens of the forward rows in `rows` only."""
    return {s.request: (s.token_start, after[_rows(s)] - before[_rows(s)]) for s in segments if s.request in rows}


def _other_blocks_of_computing_rows(x: torch.Tensor, segments: list[Segment], n_rows: int, ctx: AttentionContext,
                                    caches: BlockCaches, other_blocks: OtherBlocks) -> torch.Tensor:
    """The blocks after the first: the skipped rows add their request's kept residual, the others run them."""
    if not caches.skipped:
        return other_blocks(x, None)
    out = x.clone()
    tails = {row: request.tail[j] for request in caches.first_block if request.tail is not None
             for j, row in enumerate(request.rows)}
    for s in segments:
        if s.request in caches.skipped:
            out[_rows(s)] = x[_rows(s)] + tails[s.request][s.tokens].to(x.dtype)
    subset = row_subset(segments, [row for row in range(n_rows) if row not in caches.skipped], x.device)
    if len(subset.index):
        out[subset.index] = other_blocks(x.index_select(0, subset.index), subset)
    return out
