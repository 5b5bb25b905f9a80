"""One-off pipelining vs synchronous GRPO+ steps on the CPU run, same config, one run each.

Uses configs/train/tiny-cpu.yaml with PPO epochs raised and reward tests lowered
so that training a batch takes about as long as sampling and scoring one (the
regime the target is set for), no held-out evaluation, --steps steps. Prints the mean wall time per step
(first step excluded: nothing to overlap yet) with its split, and the ratio.
Target: pipelined at least 1.3x faster.

    python -m benchmarks.grpo_pipeline [--steps 8] [--epochs 18] [--tests 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray

from common.paths import PROJECT_ROOT
from deployments.coder.tiny_model import write_tiny_coder
from training.config import load_config
from training.train import run


def measure(pipeline: str, policy: Path, storage: Path, steps: int, epochs: int, tests: int) -> list[dict]:
    config = PROJECT_ROOT / "configs/train/tiny-cpu.yaml"
    base = load_config(config)
    cfg = load_config(config, model={"path": str(policy)}, storage_path=str(storage), name=f"bench-{pipeline}",
                      steps=steps, pipeline=pipeline,
                      data={**base.data.model_dump(), "held_out": None},
                      algorithm={**base.algorithm.model_dump(), "epochs": epochs},
                      reward={**base.reward.model_dump(), "tests_per_problem": tests})
    run(cfg)
    rows = [json.loads(line) for line in cfg.metrics_path().read_text().splitlines()]
    return [r for r in rows if r["step"] >= 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--tests", type=int, default=3, help="reward tests per problem")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = write_tiny_coder(Path(tmp) / "policy", seed=0, init_std=0.02)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results = {p: measure(p, policy, Path(tmp) / "runs", args.steps, args.epochs, args.tests) for p in ("sync", "one_off")}
        finally:
            ray.shutdown()
    means = {}
    for pipeline, rows in results.items():
        mean = {k: statistics.mean(r[k] for r in rows) for k in ("step_s", "generate_s", "wait_rollout_s", "train_s")}
        means[pipeline] = mean["step_s"]
        print(f"{pipeline:>8}: {mean['step_s']:.2f} s/step | sampling {mean['generate_s']:.2f} s, waiting for the "
              f"rollout {mean['wait_rollout_s']:.2f} s, training {mean['train_s']:.2f} s "
              f"(steps 1..{args.steps - 1}, staleness {sorted({r['staleness'] for r in rows})})")
    print(f"one-off pipelining: {means['sync'] / means['one_off']:.2f}x faster per step than synchronous")


if __name__ == "__main__":
    main()
