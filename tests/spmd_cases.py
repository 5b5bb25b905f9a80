"""Worker functions that tests run on spawned gloo ranks (they must be importable)."""

from __future__ import annotations

import torch

from attention.plan import BrickPlan
from attention.ring import CommStats, brick_attention


def rows_of(plan: BrickPlan, rank: int, per_request: list[torch.Tensor]) -> torch.Tensor:
    """This rank's packed rows: its shard of each request, in plan order."""
    parts = [per_request[s.assignment.request][s.assignment.bounds[s.position]:s.assignment.bounds[s.position + 1]]
             for s in plan.local_shards(rank)]
    return torch.cat(parts) if parts else per_request[0][:0]


def scatter_back(plan: BrickPlan, outputs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reassemble every request from the ranks' packed outputs."""
    full = [torch.full_like(t, float("nan")) for t in like]
    for rank, out in enumerate(outputs):
        for s in plan.local_shards(rank):
            a = s.assignment
            full[a.request][a.bounds[s.position]:a.bounds[s.position + 1]] = out[s.start:s.start + s.length]
    return full


def brick_cases(rank: int, world_size: int, cases: list) -> list[tuple[torch.Tensor, int]]:
    results = []
    for plan, q, k, v in cases:
        stats = CommStats()
        out = brick_attention(rows_of(plan, rank, q), rows_of(plan, rank, k), rows_of(plan, rank, v), plan, rank,
                              stats=stats)
        results.append((out, stats.bytes_sent))
    return results


def packed_forward_cases(rank: int, world_size: int, payload) -> list[dict]:
    """This rank's output rows of a sharded packed forward per plan: {request: (token_start, rows)}."""
    from attention.context import ShardedAttention
    from models import load_adapter
    from tests.conftest import tiny_spec

    family, requests, plans = payload
    adapter = load_adapter(tiny_spec(family), ["transformer"])  # seeded: the same weights in every process
    with torch.no_grad():
        return [adapter.packed_module.output_rows(adapter.transformer, requests, ShardedAttention(plan, rank))
                for plan in plans]
