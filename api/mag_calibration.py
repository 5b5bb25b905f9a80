"""MagCache calibration of a served model: its magnitude ratios, measured by diffusers' own calibration hooks.

MagCache decides which steps skip the blocks from the checkpoint's magnitude ratios: per step,
the mean over tokens of |residual_t| / |residual_t-1|, the blocks' residual (output minus
input) of one step against the previous one's. diffusers measures them
(`MagCacheConfig(calibrate=True)`: nothing skipped, the ratios logged at the end of a run, per
cache context: cond and uncond). This runs the model's diffusers pipeline, loaded from its
checkpoint as the server loads it, on a few prompts and seeds, and prints the mean ratios to
paste as the model's `mag_ratios` in the Serve config.

    python -m api.mag_calibration --model shapes-t2v --steps 20
"""

from __future__ import annotations

import argparse
import ast
import logging
from pathlib import Path

import torch
from diffusers import MagCacheConfig

from api.serve_configs import LOCAL_CONFIG, serve_application
from api.validation import video_size
from models import load_adapter
from models.spec import ModelSpec

DEFAULT_PROMPTS = ("a red circle moving left", "a blue square standing still", "a green triangle moving up",
                   "a yellow circle moving right")
_RESULTS = "MagCache Calibration Results: "


class _CalibrationLog(logging.Handler):
    """Collects the ratio lists diffusers' MagCache hooks log at the end of each calibrated run and context."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.runs: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(_RESULTS):
            self.runs.append([float(r) for r in ast.literal_eval(message.removeprefix(_RESULTS))])


@torch.no_grad()
def calibrate(spec: ModelSpec, prompts: list[str], steps: int, height: int, width: int, frames: int,
              seeds: int = 1) -> list[float]:
    """Mean magnitude ratios over every prompt, seed and CFG context: one per step."""
    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    pipeline.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    log = _CalibrationLog()
    hooks_logger = logging.getLogger("diffusers.hooks.mag_cache")
    hooks_logger.addHandler(log)
    previous_level = hooks_logger.level
    hooks_logger.setLevel(logging.INFO)
    try:
        for prompt in prompts:
            for seed in range(seeds):
                pipeline(prompt=prompt, negative_prompt=spec.default_negative_prompt, height=height, width=width,
                         num_frames=frames, num_inference_steps=steps, guidance_scale=spec.default_guidance_scale,
                         generator=torch.Generator().manual_seed(seed), output_type="latent",
                         max_sequence_length=spec.max_sequence_length)
    finally:
        hooks_logger.removeHandler(log)
        hooks_logger.setLevel(previous_level)
        pipeline.transformer.disable_cache()
    if not log.runs or any(len(run) != steps for run in log.runs):
        raise RuntimeError(f"diffusers logged {[len(r) for r in log.runs]} ratios per run, expected {steps} each")
    return [sum(run[k] for run in log.runs) / len(log.runs) for k in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=LOCAL_CONFIG)
    parser.add_argument("--app", default="video")
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's default_steps")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--resolution", default=None, help="default: the model's first")
    parser.add_argument("--aspect-ratio", default=None, help="default: the model's first (16:9 if it lists none)")
    args = parser.parse_args()
    models = serve_application(args.app, args.config)["args"]["models"]
    spec = ModelSpec(**next(m for m in models if m["name"] == args.model))
    resolution = args.resolution or next(iter(spec.resolution_heights))
    aspect_ratio = args.aspect_ratio or (spec.aspect_ratios or ["16:9"])[0]
    height, width = video_size(spec, load_adapter(spec, parts=()).geometry, resolution, aspect_ratio)
    steps = args.steps or spec.default_steps
    ratios = calibrate(spec, args.prompt or list(DEFAULT_PROMPTS), steps, height, width, spec.default_frames,
                       args.seeds)
    print(f"# {spec.name}: {steps} steps, {height}x{width}, {spec.default_frames} frames")
    print("mag_ratios: [" + ", ".join(f"{r:.5f}" for r in ratios) + "]")


if __name__ == "__main__":
    main()
