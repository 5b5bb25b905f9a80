"""Brick Attention vs padded Ring Attention on 2 and 4 CPU ranks (gloo), one mixed batch.

Workload: one long request and several short ones (token counts below), 8 heads of
64 dims, fp32. Both sides run the same SPMD kernel (`attention.ring.brick_attention`):
- padded ring: every request padded to the longest and sharded over one ring of all
  ranks (what a system without varlen/per-request rings does; masking the pads would
  cost the same, so they are left unmasked here);
- varlen ring: no padding, but every request still on one ring of all ranks
  (ring-flash-attention's varlen mode);
- Brick: the planner's rings (short requests stay on one rank, the long one spreads)
  with varlen packing, no padding.
Prints wall time per call (slowest rank, median of --repeats) and bytes sent (all
ranks), and Brick's ratios against both rings.

    python -m benchmarks.brick_vs_ring [--long 4096] [--short 256 --n-short 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from attention.plan import BrickPlan, single_ring_plan
from attention.planner import BrickCostModel, plan_brick
from attention.ring import CommStats, brick_attention
from common.spmd import run_spmd

HEADS, DIM = 8, 64


def _measure(rank: int, world: int, payload) -> dict:
    plans, repeats = payload
    out = {}
    for name, plan in plans.items():
        n = plan.local_tokens(rank)
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(n, HEADS, DIM, generator=g) for _ in range(3))
        brick_attention(q, k, v, plan, rank)  # warm-up
        times, stats = [], CommStats()
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            stats = CommStats()
            brick_attention(q, k, v, plan, rank, stats=stats)
            times.append(time.perf_counter() - start)
        out[name] = (times, stats.bytes_sent, n)
    return out


def compare(world: int, tokens: list[int], repeats: int, cost: BrickCostModel) -> None:
    padded = single_ring_plan([max(tokens)] * len(tokens), world)
    brick: BrickPlan = plan_brick(tokens, world, cost)
    plans = {"padded ring": padded, "varlen ring": single_ring_plan(tokens, world), "brick": brick}
    results = run_spmd(world, _measure, (plans, repeats), threads_per_rank=1)
    print(f"\n{world} ranks, tokens {tokens}; brick rings: {[a.ranks for a in brick.assignments]}")
    summary = {}
    for name in plans:
        # Per repeat, the call takes as long as its slowest rank.
        per_call = [max(r[name][0][i] for r in results) for i in range(repeats)]
        sent = sum(r[name][1] for r in results)
        rows = [r[name][2] for r in results]
        summary[name] = (statistics.median(per_call), sent)
        print(f"  {name:>11}: {summary[name][0] * 1000:8.1f} ms/call | {sent / 2**20:8.2f} MiB sent | "
              f"rows per rank {rows}")
    t_brick, b_brick = summary["brick"]
    for baseline in ("padded ring", "varlen ring"):
        t, b = summary[baseline]
        print(f"  brick vs {baseline}: {t / t_brick:.2f}x faster, {b_brick / max(b, 1):.3f} of the bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", type=int, default=4096)
    parser.add_argument("--short", type=int, default=256)
    parser.add_argument("--n-short", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-shard-tokens", type=int, default=512,
                        help="planner threshold; smaller than on GPU because CPU attention is slow next to gloo")
    args = parser.parse_args()
    tokens = [args.long] + [args.short] * args.n_short
    cost = BrickCostModel(min_shard_tokens=args.min_shard_tokens)
    for world in (2, 4):
        compare(world, tokens, args.repeats, cost)


if __name__ == "__main__":
    main()
