"""Model adapters (one per diffusers family) and their packed forwards; a family is imported only when named."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable

from models.interface import Part
from models.spec import ModelSpec

if TYPE_CHECKING:  # only the type: models.base loads diffusers, which a family's import brings when needed
    from models.base import DiffusionAdapter

_REGISTRY: dict[str, str] = {
    "cogvideox": "models.cogvideox:CogVideoXAdapter",
    "mochi": "models.mochi:MochiAdapter",
    "wan": "models.wan:WanAdapter",
    "sd3": "models.sd3:SD3Adapter",
    "ltx": "models.ltx:LTXAdapter",
    "hunyuanvideo15": "models.hunyuanvideo15:HunyuanVideo15Adapter",
}


def adapter_class(family: str) -> type[DiffusionAdapter]:
    if family not in _REGISTRY:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_REGISTRY)}")
    module, name = _REGISTRY[family].split(":")
    return getattr(importlib.import_module(module), name)


def load_adapter(spec: ModelSpec, parts: Iterable[Part], device: str = "cpu") -> DiffusionAdapter:
    """Build `spec`'s adapter holding only `parts` (plus configs and the sampler config)."""
    return adapter_class(spec.family)(spec, parts).to(device)
