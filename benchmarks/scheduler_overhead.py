"""Scheduler overhead per step vs the tiny model's step time.

Measures the step scheduler's own work (policy ordering + budget fill + plan
building + per-request bookkeeping in postprocess, with zero predictions so no
model runs) with 10, 100 and 1,000 pooled requests, and prints it as a fraction
of one real transformer step of the tiny CogVideoX model measured in this run.
Target: under 1 ms per step at 1,000 pooled requests.

    python -m benchmarks.scheduler_overhead [--policy srptf] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deployments.batch_plan import BatchPlan, StepOutput
from deployments.dit_worker import DiTWorkerCore
from deployments.models import load_adapter
from deployments.models.base import EncodedPrompt
from deployments.policies import make_policy
from deployments.request import GenerationSpec
from deployments.step_scheduler import StepSchedulerCore
from serve_graph.config import BudgetConfig, ModelSpec

SPEC = ModelSpec(name="cog", family="cogvideox", max_sequence_length=16, max_frames=17)
SIZES = [(32, 48), (48, 80), (64, 112), (96, 160)]


def _prompt() -> EncodedPrompt:
    cond = {"encoder_hidden_states": torch.zeros(1, 16, 32)}
    return EncodedPrompt(cond=cond, uncond=dict(cond))


def _fill(core: StepSchedulerCore, n: int, start: int) -> None:
    for i in range(start, start + n):
        h, w = SIZES[i % len(SIZES)]
        core.admit(GenerationSpec(f"r{i}", "cog", h, w, 9, num_inference_steps=200 if i % 2 else 50,
                                  guidance_scale=6.0, seed=i), _prompt())


def zero_output(plan: BatchPlan) -> StepOutput:
    return StepOutput(predictions={rid: torch.zeros_like(x) for sb in plan.sub_batches
                                   for rid, x in zip(sb.request_ids, sb.latents)})


def scheduler_overhead_ms(pool_size: int, policy: str, steps: int, budget: BudgetConfig) -> float:
    adapters = {"cog": load_adapter(SPEC, parts=())}
    core = StepSchedulerCore(adapters, make_policy(policy), budget, max_pool_size=pool_size + 16)
    _fill(core, pool_size, 0)
    next_id, samples = pool_size, []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = core.schedule()
        t1 = time.perf_counter()
        output = zero_output(plan)  # stands in for the worker; not timed
        t2 = time.perf_counter()
        core.postprocess(plan, output)
        core.pop_done()
        samples.append((t1 - t0) + (time.perf_counter() - t2))
        missing = pool_size - len(core.pool)  # keep the pool at its size: finished requests are replaced
        _fill(core, missing, next_id)
        next_id += missing
    return statistics.median(samples) * 1e3


def model_step_ms(budget: BudgetConfig, repeats: int = 20) -> float:
    """One real tiny-CogVideoX step for a full batch (max_batch_size requests of mixed sizes)."""
    adapters = {"cog": load_adapter(SPEC, parts=())}
    core = StepSchedulerCore(adapters, make_policy("fifo"), budget)
    _fill(core, budget.max_batch_size, 0)
    worker = DiTWorkerCore([SPEC])
    plan = core.schedule()
    worker.execute(plan)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        worker.execute(plan)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="srptf", choices=["fifo", "srptf"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = BudgetConfig(max_batch_size=args.max_batch_size, max_batch_tokens=10**9)
    step = model_step_ms(budget)
    print(f"tiny CogVideoX step ({args.max_batch_size} mixed-size requests, CFG): {step:.2f} ms")
    print(f"{'pooled':>8} {'policy':>7} {'overhead ms/step':>17} {'fraction of step':>17} {'target <1 ms':>13}")
    for n in (10, 100, 1000):
        ms = scheduler_overhead_ms(n, args.policy, args.steps, budget)
        print(f"{n:>8} {args.policy:>7} {ms:>17.3f} {ms / step:>17.3f} {'yes' if ms < 1 else 'NO':>13}")


if __name__ == "__main__":
    main()
