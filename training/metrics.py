"""Prometheus gauges of a GRPO+ run (through `ray.util.metrics`; Ray exports them as `ray_grpo_*`).

Set once per step by the trainer, next to `metrics.jsonl`; the Grafana training
dashboard reads them. Created on a Ray worker (Ray metrics need one).
"""

from __future__ import annotations

from ray.util.metrics import Gauge

STEP_FIELDS = {
    "mean_reward": "Mean sparse reward of the step's samples.",
    "groups_with_signal": "Fraction of groups whose rewards differ (the rest carry no gradient).",
    "response_tokens": "Mean response length in tokens.",
    "truncated": "Fraction of responses cut at the length limit (overlong-filtered).",
    "clip_fraction": "Fraction of counted tokens where the clipped surrogate was the minimum.",
    "entropy": "Mean token entropy of the policy over response tokens (logged, not optimised).",
    "staleness": "Optimiser steps between the weights that sampled the batch and those trained.",
    "max_response_tokens": "Response length limit in force (context lengthening schedule).",
    "held_out_reward": "Mean reward on the held-out problems.",
}
PHASES = {"generate_s": "generate", "wait_rollout_s": "wait_rollout", "train_s": "train",
          "weight_sync_s": "weight_sync", "replica_pause_s": "replica_pause", "step_s": "step"}


class TrainingMetrics:
    def __init__(self, run: str = "grpo") -> None:
        self.run = run
        self.gauges = {name: Gauge(f"grpo_{name}", description=text, tag_keys=("run",))
                       for name, text in STEP_FIELDS.items()}
        self.step = Gauge("grpo_step", description="Last finished optimiser step.", tag_keys=("run",))
        self.seconds = Gauge("grpo_phase_seconds", description="Wall time of the last step, by phase.",
                             tag_keys=("run", "phase"))

    def record(self, metrics: dict) -> None:
        tags = {"run": self.run}
        for name, gauge in self.gauges.items():
            if isinstance(metrics.get(name), (int, float)):
                gauge.set(float(metrics[name]), tags=tags)
        for field, phase in PHASES.items():
            if isinstance(metrics.get(field), (int, float)):
                self.seconds.set(float(metrics[field]), tags={**tags, "phase": phase})
        if isinstance(metrics.get("step"), int):
            self.step.set(metrics["step"], tags=tags)
