"""VaeDecoder: final latents -> frames -> mp4 / png (calls batched by Serve, each request decoded alone)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import torch
from ray import serve

from deployments import init_replica
from deployments.media import encode_mp4, encode_png
from models import load_adapter
from models.spec import ModelSpec


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
        """Decode and encode each request on its own.

        The API promises the same bytes for the same seed alone or batched, and the VAE's
        3D convolutions are not batch-invariant on CPU (oneDNN picks kernels by batch
        size: one level of 255 apart was measured for batch 3 vs 1). Each request's
        latents are decoded exactly once, so batching would only save call overhead,
        which the Serve batch already saves.
        """
        out = []
        for r in requests:
            video = self.adapters[r.model].decode(r.latents)[0]
            out.append(encode_mp4(video, r.fps) if r.media == "mp4" else encode_png(video[0]))
        return out


@serve.deployment(max_ongoing_requests=256)
class VaeDecoder:
    def __init__(self, models: list[dict], resources: dict) -> None:
        res = init_replica(resources)
        self.core = VaeDecoderCore([ModelSpec(**m) for m in models], device=res.device)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def decode(self, requests: list[DecodeRequest]) -> list[bytes]:
        return await asyncio.to_thread(self.core.decode_batch, requests)
