"""Typed messages between the step scheduler and the DiT worker.

A `BatchPlan` is everything one denoising step executes. In this version a plan
holds dense sub-batches of same-shaped requests; the packed (varlen) path and
Brick Attention add rank / ring placement fields here, not new method names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deployments.models.base import EncodedPrompt


@dataclass
class SubBatch:
    """Same-shaped requests of one model, run in one transformer forward."""

    model: str
    request_ids: list[str]
    latents: list[torch.Tensor]  # each (1, *latent_shape), already scaled by the sampler
    timesteps: list[torch.Tensor]  # 0-d, one per request (they may differ)
    prompts: list[EncodedPrompt]
    guidance_scales: list[float]

    @property
    def rows(self) -> int:
        return sum(2 if p.uncond is not None else 1 for p in self.prompts)


@dataclass
class BatchPlan:
    step_id: int
    sub_batches: list[SubBatch]
    num_tokens: int

    @property
    def request_ids(self) -> list[str]:
        return [rid for sb in self.sub_batches for rid in sb.request_ids]


@dataclass
class StepOutput:
    """Guided noise predictions by request id; requests whose forward failed are in `errors`."""

    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    execute_seconds: float = 0.0
