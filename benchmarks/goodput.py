"""Goodput under a latency SLO on the 8 x H100 profile, with the whole job priced (encode, denoise, VAE decode).

For each model and system (configurations of the one engine, `benchmarks/systems/`), the
simulator (`benchmarks.simulator`, the real scheduler on a virtual clock, the VAE decode
on one replica in the policy's order) replays seeded Poisson traces and reports:

- the highest arrival rate each system sustains with the p95 of latency / isolated
  latency at most `SLO` (3x: TetriServe / GF-DiT's goodput), isolated latency being the
  request alone on its best ring, plus its encode and decode (`physical_limit_s`),
  found by bisection;
- the mean latency at 0.5 and 0.8 of Naive + Ring's capacity: the highest rate it keeps up
  with (`simulator.is_stable`: a tenth of the trace or less still in the system at the
  last arrival), bisected;
- the ratios of the shipped default (CB + Brick + SRPTF, cost-model batching) to
  Naive + Ring, same-shape step batching (vLLM-Omni's step mode) and the fixed batch of 8.

    python -m benchmarks.goodput            # 3 models, 200 requests per trace (~5 minutes)
    python -m benchmarks.goodput --quick    # cogvideox only, 60 requests
"""

from __future__ import annotations

import argparse
import math
import statistics

from benchmarks.cost_profiles import CostProfile, H100Profile
from benchmarks.simulator import capacity, is_stable, load_system, physical_limit_s, simulate
from benchmarks.workloads import make_trace

SLO = 3.0
SYSTEMS = ("naive_ring", "same_shape_step_sp", "cb_brick_srptf_fill", "cb_brick_srptf")
DEFAULT, NAIVE, SAME_SHAPE, FIXED = "cb_brick_srptf", "naive_ring", "same_shape_step_sp", "cb_brick_srptf_fill"
SEED = 21


def slowdown_p95(model: str, rate: float, system: str, requests: int, profile: CostProfile) -> float:
    """p95 over the trace's requests of latency / isolated latency."""
    outcomes = simulate(make_trace(model, requests, rate, seed=SEED), load_system(system), profile)
    ratios = sorted(o.latency_s / physical_limit_s(o.request, profile) for o in outcomes)
    return ratios[min(len(ratios) - 1, math.ceil(0.95 * len(ratios)) - 1)]


def highest_rate(model: str, meets, profile: CostProfile, bisections: int = 8) -> float:
    """The highest rate at which `meets(rate)` holds, bisected between 0 and twice the machine's capacity."""
    low, high = 0.0, 2.0 * capacity(model, profile)
    for _ in range(bisections):
        middle = (low + high) / 2
        if meets(middle):
            low = middle
        else:
            high = middle
    return low


def sustainable_rate(model: str, system: str, requests: int, profile: CostProfile) -> float:
    """The highest rate whose p95 slowdown is within the SLO."""
    return highest_rate(model, lambda rate: slowdown_p95(model, rate, system, requests, profile) <= SLO, profile)


def stable_rate(model: str, system: str, requests: int, profile: CostProfile) -> float:
    """The highest rate the system keeps up with (its capacity on this trace)."""
    return highest_rate(model, lambda rate: is_stable(simulate(make_trace(model, requests, rate, seed=SEED),
                                                               load_system(system), profile)), profile)


def mean_latency_at(model: str, rate: float, system: str, requests: int, profile: CostProfile) -> float:
    return statistics.mean(o.latency_s for o in simulate(make_trace(model, requests, rate, seed=SEED),
                                                          load_system(system), profile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models, requests = (("cogvideox",), 60) if args.quick else (("cogvideox", "mochi", "wan"), 200)
    profile = H100Profile()
    for model in models:
        rates = {s: sustainable_rate(model, s, requests, profile) for s in SYSTEMS}
        print(f"\n{model}: sustainable rate with p95 latency <= {SLO:g}x isolated (jobs/s), {requests} requests")
        for system in SYSTEMS:
            print(f"  {load_system(system).label:36s} {rates[system]:.4f}")
        print(f"  default / naive {rates[DEFAULT] / rates[NAIVE]:.2f}x, / same-shape "
              f"{rates[DEFAULT] / rates[SAME_SHAPE]:.2f}x, / fixed batch 8 {rates[DEFAULT] / rates[FIXED]:.2f}x")
        naive_capacity = stable_rate(model, NAIVE, requests, profile)
        for fraction in (0.5, 0.8):
            rate = fraction * naive_capacity
            means = {s: mean_latency_at(model, rate, s, requests, profile) for s in SYSTEMS}
            cells = ", ".join(f"{s} {means[s]:.1f} s" for s in SYSTEMS)
            print(f"  at {fraction:g} x naive's capacity ({rate:.4f}/s): mean latency {cells}; naive / default "
                  f"{means[NAIVE] / means[DEFAULT]:.2f}x, same-shape / default {means[SAME_SHAPE] / means[DEFAULT]:.2f}x")


if __name__ == "__main__":
    main()
