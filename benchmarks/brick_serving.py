"""Brick rings in serving: planned rings vs one ring of all ranks vs no rings, through the real app on 2 ranks.

The same saturating burst (CogVideoX and Wan at the CPU default's real 240p/360p
sizes, 9 frames, 10-20 steps) runs three times through the video app of
configs/local.yaml with its 2-rank gloo group, changing only the planner:

- brick: rings sized by tokens (a row is sharded only if each rank keeps
  `min_shard_tokens`; here 360p rows get 2-rank rings, 240p rows stay on one rank);
- one ring: every row sharded over both ranks (classic ring attention, the baseline);
- data parallel: every row on one rank, rows balanced over the ranks (no rings).

Prints requests/s, mean job latency, mean time in the pool, mean step time and
the ring traffic of each, and the ratios of Brick against the two others.

    python -m benchmarks.brick_serving [--requests 16]
"""

from __future__ import annotations

import argparse
import itertools

from benchmarks.engine_step import app_args, run

HEIGHTS = {"240p": 240, "360p": 360}
MIX = list(itertools.product(["cogvideox-tiny", "wan-tiny"], HEIGHTS, [9], [10, 15, 20]))
PLANNERS = {
    "brick": {"min_shard_tokens": 1024, "ring_sizes": [1, 2]},
    "one ring": {"min_shard_tokens": 1, "ring_sizes": [1, 2]},
    "data parallel": {"min_shard_tokens": 1, "ring_sizes": [1]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    figures = {}
    for name, planner in PLANNERS.items():
        base = app_args(HEIGHTS)
        config = app_args(HEIGHTS, scheduler={**base["scheduler"], "planner": {**base["scheduler"]["planner"],
                                                                               **planner}})
        figures[name] = run(args.requests, config, MIX)
    keys = ["requests_per_s", "mean_latency_s", "mean_pool_latency_s", "step_time_s", "requests_per_step", "ring_mib"]
    print(f"{'':>14}" + "".join(f"{k:>22}" for k in keys))
    for name, f in figures.items():
        print(f"{name:>14}" + "".join(f"{f[k]:>22.3f}" for k in keys))
    brick = figures["brick"]
    for other in ("one ring", "data parallel"):
        f = figures[other]
        print(f"brick vs {other}: {brick['requests_per_s'] / f['requests_per_s']:.2f}x requests/s, "
              f"{f['mean_latency_s'] / brick['mean_latency_s']:.2f}x lower job latency, "
              f"{f['mean_pool_latency_s'] / brick['mean_pool_latency_s']:.2f}x lower time in the pool")


if __name__ == "__main__":
    main()
