"""The diffusers-free types the engine, the API and the adapters share.

How pixels map to latents and tokens (`Geometry`), one request's text conditioning
(`EncodedPrompt`), and which components an adapter holds (`Part`). Kept apart from
`models.base` so the scheduler side (`engine.messages`, `engine.scheduler`, `api.validation`)
imports no diffusers: only the processes that run a model load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Part = Literal["text", "transformer", "vae"]
Condition = dict[str, torch.Tensor]
"""Text conditioning of one forward row: tensors with a leading batch dim of 1."""


@dataclass(frozen=True)
class Geometry:
    """How pixels map to latents and transformer tokens for one model."""

    spatial_factor: int
    temporal_factor: int  # 1 for image models
    patch_size: int
    patch_size_t: int
    text_tokens: int
    is_video: bool
    frame_step: int = 0
    """Allowed frame counts are 1 + frame_step * k; 0 means temporal_factor."""

    @property
    def pixel_multiple(self) -> int:
        """Width and height must be multiples of this."""
        return self.spatial_factor * self.patch_size

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_factor + 1 if self.is_video else 1

    @property
    def frame_multiple(self) -> int:
        return self.frame_step or self.temporal_factor

    def frames_allowed(self, num_frames: int) -> bool:
        return not self.is_video or (num_frames - 1) % self.frame_multiple == 0

    def seq_len(self, height: int, width: int, num_frames: int) -> int:
        """Transformer tokens of one forward row: latent patches plus text tokens."""
        patches = (height // self.pixel_multiple) * (width // self.pixel_multiple)
        frames = math.ceil(self.latent_frames(num_frames) / self.patch_size_t)
        return patches * frames + self.text_tokens


@dataclass
class EncodedPrompt:
    """Conditioning for one request: the positive row and, with CFG, the negative row."""

    cond: Condition
    uncond: Condition | None

    @property
    def rows_in_order(self) -> list[Condition]:
        """The forward rows as a step lays them out: [uncond, cond] with CFG, [cond] without."""
        return [self.cond] if self.uncond is None else [self.uncond, self.cond]

    def with_condition(self, extra: Condition) -> "EncodedPrompt":
        """Both rows with `extra` (per-request conditioning such as a frame rate) added."""
        if not extra:
            return self
        return EncodedPrompt({**self.cond, **extra}, None if self.uncond is None else {**self.uncond, **extra})

    def to(self, device: torch.device) -> "EncodedPrompt":
        move = lambda c: {k: v.to(device) for k, v in c.items()}  # noqa: E731
        return EncodedPrompt(move(self.cond), None if self.uncond is None else move(self.uncond))


def split_rows(negative_prompts: list[str | None], cond: dict[str, torch.Tensor],
               uncond: dict[str, torch.Tensor]) -> list[EncodedPrompt]:
    """Slice batched encoder outputs into one EncodedPrompt per request (uncond only where CFG is on)."""

    def row(tensors: dict[str, torch.Tensor], i: int) -> Condition:
        return {k: v[i : i + 1].cpu() for k, v in tensors.items()}

    return [EncodedPrompt(cond=row(cond, i), uncond=None if negative is None else row(uncond, i))
            for i, negative in enumerate(negative_prompts)]
