"""Step-cache calibration of a served model, on its diffusers pipeline loaded from its checkpoint as the server
loads it, over a few prompts and seeds; prints what to paste into the model's entry of the Serve config.

- `--mode magcache`: the magnitude ratios (`mag_ratios`), measured by diffusers' own calibration
  hooks (`MagCacheConfig(calibrate=True)`: nothing skipped, per step the mean over tokens of
  |residual_t| / |residual_t-1|, the blocks' residual of one step against the previous one's,
  logged at the end of each run per cache context, cond and uncond); their mean per step.
- `--mode teacache`: TeaCache's rescaling polynomial (`teacache_coefficients`), fitted as
  TeaCache's repository fits its own: per pair of consecutive steps of each run and CFG row,
  the relative L1 change of the timestep modulation the engine decides from (x) against the
  relative L1 change of the transformer's output (y), `numpy.polyfit(x, y, 4)`.

    python -m api.cache_calibration --mode magcache --model shapes-t2v --steps 20
    python -m api.cache_calibration --mode teacache --model shapes-t2v --steps 20
"""

from __future__ import annotations

import argparse
import ast
import logging
from pathlib import Path

import numpy as np
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


def _runs(pipeline, spec: ModelSpec, prompts: list[str], steps: int, height: int, width: int, frames: int,
          seeds: int) -> None:
    """The pipeline once per prompt and seed, as the model's requests run (its negative prompt and guidance)."""
    for prompt in prompts:
        for seed in range(seeds):
            pipeline(prompt=prompt, negative_prompt=spec.default_negative_prompt, height=height, width=width,
                     num_frames=frames, num_inference_steps=steps, guidance_scale=spec.default_guidance_scale,
                     generator=torch.Generator().manual_seed(seed), output_type="latent",
                     max_sequence_length=spec.max_sequence_length)


@torch.no_grad()
def calibrate_magcache(spec: ModelSpec, prompts: list[str], steps: int, height: int, width: int, frames: int,
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
        _runs(pipeline, spec, prompts, steps, height, width, frames, seeds)
    finally:
        hooks_logger.removeHandler(log)
        hooks_logger.setLevel(previous_level)
        pipeline.transformer.disable_cache()
    if not log.runs or any(len(run) != steps for run in log.runs):
        raise RuntimeError(f"diffusers logged {[len(r) for r in log.runs]} ratios per run, expected {steps} each")
    return [sum(run[k] for run in log.runs) / len(log.runs) for k in range(steps)]


def _relative_change(now: torch.Tensor, then: torch.Tensor) -> float:
    return ((now - then).abs().mean() / then.abs().mean()).item()


def calibrate_teacache(spec: ModelSpec, prompts: list[str], steps: int, height: int, width: int, frames: int,
                       seeds: int = 1, degree: int = 4) -> list[float]:
    """TeaCache's rescaling polynomial (highest power first): the output's relative change as a function of the
    timestep modulation's, over consecutive steps of every run and CFG row."""
    x, y = teacache_points(spec, prompts, steps, height, width, frames, seeds)
    if len(x) <= degree:
        raise RuntimeError(f"{len(x)} step pairs cannot fit a degree-{degree} polynomial: run more steps or prompts")
    return [float(c) for c in np.polyfit(x, y, degree)]


@torch.no_grad()
def teacache_points(spec: ModelSpec, prompts: list[str], steps: int, height: int, width: int, frames: int,
                    seeds: int = 1) -> tuple[list[float], list[float]]:
    """Per consecutive pair of steps of every run and CFG row: the timestep modulation's relative change (x) and
    the transformer output's (y)."""
    adapter = load_adapter(spec, parts=("text", "transformer", "vae"))
    pipeline = adapter.pipeline
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # per transformer call: (timesteps, outputs) of its batch

    def record(module, args, kwargs, output) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        calls.append((timestep.reshape(-1), (output[0] if isinstance(output, tuple) else output.sample).float()))

    handle = pipeline.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        _runs(pipeline, spec, prompts, steps, height, width, frames, seeds)
    finally:
        handle.remove()
    series: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # (run, call in step, row)
    run, step_calls, last = -1, 0, None
    for timestep, outputs in calls:  # a run starts again at its first timestep; CFG contexts are calls of a step
        t = float(timestep[0])
        if last is None or t > last:
            run, step_calls = run + 1, 0
        elif t == last:
            step_calls += 1
        else:
            step_calls = 0
        last = t
        modulation = adapter.timestep_modulation(timestep[0]).float()
        for row, output in enumerate(outputs):
            series.setdefault((run, step_calls, row), []).append((modulation, output))
    x, y = [], []
    for points in series.values():
        for (m_then, o_then), (m_now, o_now) in zip(points, points[1:]):
            x.append(_relative_change(m_now, m_then))
            y.append(_relative_change(o_now, o_then))
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=LOCAL_CONFIG)
    parser.add_argument("--app", default="video")
    parser.add_argument("--mode", choices=("magcache", "teacache"), required=True)
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
    size = (spec, args.prompt or list(DEFAULT_PROMPTS), steps, height, width, spec.default_frames, args.seeds)
    print(f"# {spec.name}: {steps} steps, {height}x{width}, {spec.default_frames} frames")
    if args.mode == "magcache":
        print("mag_ratios: [" + ", ".join(f"{r:.5f}" for r in calibrate_magcache(*size)) + "]")
    else:
        print("teacache_coefficients: [" + ", ".join(f"{c:.8e}" for c in calibrate_teacache(*size)) + "]")

if __name__ == "__main__":
    main()
