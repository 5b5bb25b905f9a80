"""Synthetic request traces of DiT-Serve's evaluation (thesis section 3.3), seeded and stored as JSONL.

Arrivals are Poisson (exponential inter-arrival times at rate λ) or Gamma with a
coefficient of variation CV at the same mean rate (CV 1 is Poisson; larger CVs are
burstier: shape k = 1/CV², scale = 1/(λ·k)). The mix follows the paper: resolution
uniform over 240p / 360p / 480p / 720p, denoising steps uniform over {10, 20, 40, 80},
prompts from a fixed list, frames fixed per model (CogVideoX 41, Mochi 31, Wan 49; Wan
stands in for Open-Sora's 48 frames, which has no diffusers pipeline). The same JSONL
trace drives every system, simulated or real.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESOLUTIONS = ("240p", "360p", "480p", "720p")
STEP_CHOICES = (10, 20, 40, 80)
FRAMES = {"cogvideox": 41, "mochi": 31, "wan": 49}
PROMPTS = (
    "a red fox running through fresh snow at dawn",
    "waves crashing on black volcanic rocks, slow motion",
    "a paper boat drifting down a rainy city gutter",
    "time-lapse of clouds rolling over a mountain ridge",
    "a robot arm pouring coffee into a glass cup",
    "an astronaut riding a horse across a desert",
    "close-up of a hummingbird feeding on a flower",
    "neon signs reflecting in puddles on a night street",
)


@dataclass(frozen=True)
class TraceRequest:
    id: str
    arrival_s: float  # seconds after the trace starts
    model: str  # family: a key of FRAMES
    resolution: str
    num_frames: int
    steps: int
    prompt: str
    seed: int


def arrival_times(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Cumulative arrival times of `n` requests at mean rate `rate`/s; CV 1 is Poisson, larger is burstier."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got rate={rate}, cv={cv}")
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps)


def make_trace(model: str, n: int, rate: float, cv: float = 1.0, seed: int = 0,
               resolutions: tuple[str, ...] = RESOLUTIONS, steps: tuple[int, ...] = STEP_CHOICES,
               num_frames: int | None = None) -> list[TraceRequest]:
    """`n` requests of `model` (a FRAMES key) arriving at `rate`/s with burstiness `cv`; same seed, same trace."""
    if model not in FRAMES:
        raise ValueError(f"unknown model family {model!r}; known: {sorted(FRAMES)}")
    rng = np.random.default_rng(seed)
    times = arrival_times(n, rate, cv, rng)
    frames = num_frames or FRAMES[model]
    return [TraceRequest(id=f"{model}-{seed}-{i}", arrival_s=float(t), model=model,
                         resolution=resolutions[int(rng.integers(len(resolutions)))], num_frames=frames,
                         steps=steps[int(rng.integers(len(steps)))], prompt=PROMPTS[int(rng.integers(len(PROMPTS)))],
                         seed=int(rng.integers(2**31)))
            for i, t in enumerate(times)]


def write_jsonl(trace: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w") as f:
        for request in trace:
            f.write(json.dumps(asdict(request)) + "\n")


def read_jsonl(path: str | Path) -> list[TraceRequest]:
    with open(path) as f:
        return [TraceRequest(**json.loads(line)) for line in f if line.strip()]
