"""The step scheduler's own work per step, tensor-free, at 10 to 10,000 pooled requests.

Times the engine's `schedule()` (policy ordering + the cost rule + budget fill + plan
building) plus `complete()` (counters, the step-cost model, finished requests leave)
with no model and no tensors: the worker's answer is `StepResult.all_stepped(plan)` in
a constant step time, not timed. The pool
is kept at its size (finished requests are replaced). The baseline measured in
the same run is one real packed step of the tiny CogVideoX model for a full
batch of mixed-size requests, so the overhead prints as a fraction of a step.
Target: under 0.2 ms per step at 1,000 pooled requests.

    python -m benchmarks.scheduler_overhead [--policy srptf] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.config import BudgetConfig
from engine.engine import EngineCore, Executed, LocalExecutor
from engine.messages import NewRequest, StepResult
from engine.policies import make_policy
from engine.request import GenerationSpec
from engine.runner import ModelRunner
from engine.scheduler import StepSchedulerCore
from models import load_adapter
from models.spec import ModelSpec

SPEC = ModelSpec(name="cog", family="cogvideox", max_sequence_length=16, max_frames=17)
SIZES = [(32, 48), (48, 80), (64, 112), (96, 160)]
STAND_IN_STEP_S = 0.1


def _spec(i: int) -> GenerationSpec:
    h, w = SIZES[i % len(SIZES)]
    return GenerationSpec(model="cog", prompt="p", negative_prompt="", height=h, width=w, num_frames=9,
                          num_inference_steps=200 if i % 2 else 50, guidance_scale=6.0, seed=i, fps=8)


def _fill(engine: EngineCore, adapter, n: int, start: int, prompt=None) -> None:
    for i in range(start, start + n):
        engine.admit(NewRequest.from_spec(f"r{i}", _spec(i), prompt, adapter))


def scheduler_overhead_ms(pool_size: int, policy: str, steps: int, budget: BudgetConfig) -> float:
    adapter = load_adapter(SPEC, parts=())
    engine = EngineCore(StepSchedulerCore(make_policy(policy), budget, max_pool_size=pool_size + 16))
    _fill(engine, adapter, pool_size, 0)
    next_id, samples = pool_size, []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = engine.schedule()
        t1 = time.perf_counter()
        # Stands in for the worker (not timed): every request stepped, in a step time the cost model learns from.
        executed = Executed(StepResult.all_stepped(plan), (STAND_IN_STEP_S,))
        t2 = time.perf_counter()
        engine.complete(plan, executed)
        samples.append((t1 - t0) + (time.perf_counter() - t2))
        missing = pool_size - len(engine.scheduler.pool)
        _fill(engine, adapter, missing, next_id)
        next_id += missing
    return statistics.median(samples) * 1e3


def model_step_ms(budget: BudgetConfig, repeats: int = 20) -> float:
    """One real packed tiny-CogVideoX step for a full batch (max_batch_size requests of mixed sizes, CFG)."""
    from deployments.text_encoder import EncodeRequest, TextEncoderCore

    adapter = load_adapter(SPEC, parts=())
    prompt = TextEncoderCore([SPEC]).encode_batch([EncodeRequest("cog", "a cat", "")])[0]
    engine = EngineCore(StepSchedulerCore(make_policy("fifo"), budget, batching="fill"))  # a full batch each step
    executor = LocalExecutor(ModelRunner({"cog": load_adapter(SPEC, parts=("transformer",))}))
    _fill(engine, adapter, budget.max_batch_size, 0, prompt)
    engine.run_local(executor)  # admission step (samplers, noise) not timed; >= 50 steps remain for each request
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run_local(executor)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="srptf", choices=["fifo", "srptf"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = BudgetConfig(max_batch_size=args.max_batch_size, max_batch_tokens=10**9)
    step = model_step_ms(budget)
    print(f"tiny CogVideoX packed step ({args.max_batch_size} mixed-size requests, CFG): {step:.2f} ms")
    print(f"{'pooled':>8} {'policy':>7} {'overhead ms/step':>17} {'fraction of step':>17} {'target <0.2 ms @1000':>21}")
    for n in (10, 100, 1000, 10000):
        ms = scheduler_overhead_ms(n, args.policy, args.steps, budget)
        verdict = ("yes" if ms < 0.2 else "NO") if n == 1000 else ""
        print(f"{n:>8} {args.policy:>7} {ms:>17.3f} {ms / step:>17.3f} {verdict:>21}")


if __name__ == "__main__":
    main()
