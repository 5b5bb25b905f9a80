"""Registry of model adapters; a family's module is imported only when a config names it."""

from __future__ import annotations

import importlib
from typing import Iterable

from deployments.models.base import DiffusionAdapter, Part
from serve_graph.config import ModelSpec

_REGISTRY: dict[str, str] = {
    "cogvideox": "deployments.models.cogvideox:CogVideoXAdapter",
    "mochi": "deployments.models.mochi:MochiAdapter",
    "wan": "deployments.models.wan:WanAdapter",
    "sd3": "deployments.models.sd3:SD3Adapter",
}


def adapter_class(family: str) -> type[DiffusionAdapter]:
    if family not in _REGISTRY:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_REGISTRY)}")
    module, name = _REGISTRY[family].split(":")
    return getattr(importlib.import_module(module), name)


def load_adapter(spec: ModelSpec, parts: Iterable[Part], device: str = "cpu") -> DiffusionAdapter:
    """Build `spec`'s adapter holding only `parts` (plus configs and the sampler config)."""
    return adapter_class(spec.family)(spec, parts).to(device)
