"""coupled-GRPO vs single-mask log-likelihoods on the tiny diffusion coder: estimate variance and reward curves.

Both estimators spend the same forwards (coupled: one complementary mask pair = 2 forwards; single: 2 independent
masks) and have the same expectation (`training.coupled_grpo`; checked exactly in tests/test_coupled_grpo.py).

1. Variance: the tiny policy warm-started as configs/train/tiny-dllm-served.yaml does, then for every toy training
   problem's reference answer `--draws` estimates of the response's log-likelihood (the sum over its tokens) with
   each estimator; prints the mean variance of each and the ratio single / coupled.
2. Reward curves (skipped with `--variance-only`): the whole run of tiny-dllm-served.yaml twice, against the
   diffusion-LM app started here, same seed and config except `algorithm.estimator`; prints the mean training
   reward of every step and the held-out reward before and after.

    python -m benchmarks.coupled_grpo [--draws 200] [--steps 12] [--variance-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common.paths import PROJECT_ROOT

CONFIG = PROJECT_ROOT / "configs/train/tiny-dllm-served.yaml"


def estimate_variance(policy_dir: Path, draws: int) -> dict[str, float]:
    from training.config import load_config
    from training.coupled_grpo import canvas_batch, estimate_logprobs
    from training.dllm_policy import DllmPolicy
    from training.toy_tasks import noisy_demonstrations, train_problems

    cfg = load_config(CONFIG)
    policy = DllmPolicy(str(policy_dir), canvas_tokens=cfg.max_response_tokens(0))
    problems = train_problems()
    policy.warm_start(noisy_demonstrations(problems, cfg.warm_start.label_noise, cfg.data.seed), cfg.warm_start.steps,
                      cfg.warm_start.batch, cfg.warm_start.lr, cfg.data.seed)
    policy.model.eval()
    variances: dict[str, list[float]] = {"coupled": [], "single": []}
    for problem in problems[::4]:
        prompt = policy.tokenizer(policy.prompt(problem.statement), add_special_tokens=False).input_ids
        answer = policy.tokenizer(problem.reference_solutions[0], add_special_tokens=False).input_ids
        for estimator, values in variances.items():
            batch = canvas_batch([prompt] * draws, [answer] * draws, [cfg.max_response_tokens(0)] * draws,
                                 policy.eos_id, 1, estimator, cfg.algorithm.mask_ratio_low, list(range(draws)))
            with torch.no_grad():
                estimate, _ = estimate_logprobs(policy.model, batch, policy.mask_id)
            values.append(float(estimate.sum(1).var()))
    return {name: statistics.mean(values) for name, values in variances.items()}


def reward_curves(policy_dir: Path, steps: int, storage: Path) -> dict[str, dict]:
    import ray
    from ray import serve

    from api.serve_configs import serve_application
    from common.spmd import free_port
    from serve_graph.dllm_app import build_dllm_app
    from training.config import load_config
    from training.train import run

    app = serve_application("dllm")
    app["args"]["models"][0]["source"] = str(policy_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_dllm_app(app["args"]), name="dllm", route_prefix=app["route_prefix"])
    curves = {}
    try:
        for estimator in ("coupled", "single"):  # each run syncs its warm-started weights into the app first
            base = load_config(CONFIG)
            cfg = load_config(CONFIG, model={**base.model.model_dump(), "path": str(policy_dir)},
                              algorithm={**base.algorithm.model_dump(), "estimator": estimator},
                              name=f"coupled-grpo-bench-{estimator}", storage_path=str(storage), steps=steps)
            run(cfg)
            rows = [json.loads(line) for line in cfg.metrics_path().read_text().splitlines()]
            curves[estimator] = {"held_out": (rows[0]["held_out_reward"], rows[-1]["held_out_reward"]),
                                 "reward": [r["mean_reward"] for r in rows[1:]]}
    finally:
        serve.shutdown()
        ray.shutdown()
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variance-only", action="store_true")
    args = parser.parse_args()

    from models.dllm.tiny import write_tiny_dllm

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = write_tiny_dllm(Path(tmp) / "policy", seed=0, init_std=0.02)
        variance = estimate_variance(policy_dir, args.draws)
        print(f"log-likelihood estimate variance (sum over a response, {args.draws} draws, 2 forwards each): "
              f"coupled {variance['coupled']:.2f}, single {variance['single']:.2f}, "
              f"single / coupled = {variance['single'] / variance['coupled']:.2f}x")
        if args.variance_only:
            return
        curves = reward_curves(policy_dir, args.steps, Path(tmp) / "runs")
    for estimator, curve in curves.items():
        start, end = curve["held_out"]
        print(f"{estimator:8s} held-out {start:.3f} -> {end:.3f}; training reward by step: "
              + " ".join(f"{r:.2f}" for r in curve["reward"]))


if __name__ == "__main__":
    main()
