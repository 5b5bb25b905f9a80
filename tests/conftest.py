"""Shared fixtures: tiny model specs (random weights, no download) and the one local Ray + Serve cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
from ray import serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from api.config import ModelSpec
from common.spmd import free_port

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


@dataclass(frozen=True)
class ServeCluster:
    port: int  # Serve's HTTP proxy on 127.0.0.1
    metrics_port: int  # Ray's Prometheus export

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    """Environment variables the module's replicas read (API keys, tokens); a module overrides this fixture. They
    are set before `ray.init`, since Ray's workers inherit the environment the cluster started with."""
    return {}


@pytest.fixture(scope="module")
def serve_cluster(cluster_env: dict[str, str]) -> Iterator[ServeCluster]:
    """A local Ray cluster of 2 CPUs (CI's machine) with Serve's HTTP proxy on a free port, for one module's apps;
    shut down, and its environment variables removed, after the module."""
    cluster = ServeCluster(free_port(), free_port())
    os.environ.update(cluster_env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=cluster.metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": cluster.port})
    yield cluster
    serve.shutdown()
    ray.shutdown()
    for name in cluster_env:
        os.environ.pop(name, None)
