"""Shared fixtures: tiny model specs (random weights, no download)."""

from __future__ import annotations

import os

import pytest
import ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from api.config import ModelSpec

TEST_HEIGHTS = {"240p": 32, "360p": 48, "480p": 64, "720p": 96}
"""Tests render the resolution names scaled down (the CPU default serves them at real size): fast and all four."""


def tiny_spec(family: str, name: str | None = None, **overrides) -> ModelSpec:
    fields = dict(name=name or f"{family}-tiny", family=family, max_sequence_length=16,
                  resolution_heights=TEST_HEIGHTS, max_frames=17, default_frames=1 if family == "sd3" else 9,
                  default_steps=6, max_image_side=128)
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.fixture(scope="session")
def cog_spec() -> ModelSpec:
    return tiny_spec("cogvideox")


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_over():
    """A module whose Ray fixture died mid-setup (e.g. a timeout) must not make every later `ray.init` fail."""
    if ray.is_initialized():
        ray.shutdown()
    yield
