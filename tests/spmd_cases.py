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


def tiny_transformer(family: str):
    """The tiny model of `family`, built identically in every process (seeded weights)."""
    from deployments.models import load_adapter
    from tests.conftest import tiny_spec

    return load_adapter(tiny_spec(family), ["transformer"]).pipeline.transformer


def packed_forward_cases(rank: int, world_size: int, payload) -> list[dict]:
    """This rank's output rows of a sharded packed forward per plan: {request: (token_start, rows)}."""
    from deployments.models import packed_cogvideox, packed_wan
    from deployments.models.packed import ShardedAttention, rows_by_request

    family, requests, plans = payload
    module = {"wan": packed_wan, "cogvideox": packed_cogvideox}[family]
    model = tiny_transformer(family)
    results = []
    with torch.no_grad():
        for plan in plans:
            rows, segments = module.forward_rows(model, requests, ShardedAttention(plan, rank))
            results.append(rows_by_request(rows, segments))
    return results
