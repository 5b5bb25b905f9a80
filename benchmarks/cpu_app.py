"""The real CPU app the cost profile measures and the real runs replay: its models, sizes and Brick planner.

Shared by `cpu_profile` (the grid it measures, the app it calibrates against) and `real_run` (the app it
deploys), so both describe one app.
"""

from __future__ import annotations

from api.serve_configs import serve_application
from api.validation import video_size
from benchmarks.workloads import FRAMES
from engine.config import PlannerConfig
from models import load_adapter
from models.spec import ModelSpec

HEIGHTS = {"240p": 32, "360p": 48, "480p": 64, "720p": 96}
MODELS = {"cogvideox": "cogvideox-tiny", "wan": "wan-tiny"}
"""Trace family -> served tiny model. Mochi is left out on CPU: its packed rows depend on each prompt's length."""
PLANNER = PlannerConfig(min_shard_tokens=256, ring_sizes=(1, 2), linear_tokens=192)
"""480p and 720p rows (>= 512 tokens) shard over both ranks; 240p and 360p stay on one."""


def model_specs() -> list[ModelSpec]:
    return [ModelSpec(name=name, family=family, source="tiny", max_sequence_length=16, resolution_heights=HEIGHTS,
                      max_frames=max(FRAMES.values()), default_frames=9, default_steps=8)
            for family, name in MODELS.items()]


def real_app_args(scheduler: dict) -> dict:
    """configs/local.yaml's video app serving the CPU profile's models and sizes, with `scheduler` (a system's)."""
    args = serve_application("video")["args"]
    args["models"] = [s.model_dump(exclude_none=True) for s in model_specs()]
    args["scheduler"] = {**scheduler, "planner": {**PLANNER.model_dump(), **scheduler.get("planner", {})},
                         "max_pool_size": 256, "budget": {**scheduler.get("budget", {}), "max_batch_tokens": 10**6}}
    return args


def pixel_size(family: str, resolution: str) -> tuple[int, int]:
    spec = next(s for s in model_specs() if s.family == family)
    return video_size(spec, load_adapter(spec, parts=()).geometry, resolution, "16:9")
