"""VaeDecoder: final latents -> frames -> mp4 / png, batched across requests."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from ray import serve

from deployments import init_replica
from deployments.media import encode_mp4, encode_png
from deployments.models import load_adapter
from serve_graph.config import ModelSpec


@dataclass(frozen=True)
class DecodeRequest:
    model: str
    latents: torch.Tensor  # (1, *latent_shape)
    media: Literal["mp4", "png"]
    fps: int = 8


class VaeDecoderCore:
    def __init__(self, models: list[ModelSpec], device: str = "cpu") -> None:
        self.adapters = {m.name: load_adapter(m, parts=("vae",), device=device) for m in models}

    def decode_batch(self, requests: list[DecodeRequest]) -> list[bytes]:
        """Same-shaped latents of one model decode in one VAE call; each result is encoded alone."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.model, tuple(r.latents.shape))].append(i)
        out: list[bytes] = [b""] * len(requests)
        for (model, _), indices in groups.items():
            frames = self.adapters[model].decode(torch.cat([requests[i].latents for i in indices]))
            for i, video in zip(indices, frames):
                r = requests[i]
                out[i] = encode_mp4(video, r.fps) if r.media == "mp4" else encode_png(video[0])
        return out


@serve.deployment(max_ongoing_requests=256)
class VaeDecoder:
    def __init__(self, models: list[dict], resources: dict) -> None:
        res = init_replica(resources)
        self.core = VaeDecoderCore([ModelSpec(**m) for m in models], device=res.device)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def decode(self, requests: list[DecodeRequest]) -> list[bytes]:
        return await asyncio.to_thread(self.core.decode_batch, requests)
