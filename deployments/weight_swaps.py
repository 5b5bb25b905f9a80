"""What a serving replica reports about its weights, the same for the coder (vLLM) and the diffusion-LM replicas.

A trainer syncing weights into an app (`training.rollout.ServedRollout`) reads these fields from every replica:
that each took the version it sent (`source`, `trainer_version`) and how long users' requests stood still.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a replica serves: `source` is a directory or `memory`; `version` counts successful swaps;
    `trainer_version` is the trainer's step count of in-memory weights (None for a directory)."""

    source: str
    version: int
    trainer_version: int | None
    last_reload_seconds: float | None


@dataclass(frozen=True)
class ReloadResult:
    """One swap: `pause_seconds` until the replica stopped stepping (the coder: vLLM's pause; the diffusion LM:
    the step in flight, which still runs, finishing), `load_seconds` of loading, `total_seconds` from the call
    until it serves the new weights."""

    source: str
    version: int
    trainer_version: int | None
    pause_seconds: float
    load_seconds: float
    total_seconds: float
