"""Factory helpers for scheduler tests: real tiny adapters, requests by shape and step count."""

from __future__ import annotations

import itertools

import torch

from deployments.batch_plan import BatchPlan, StepOutput
from deployments.models.base import DiffusionAdapter, EncodedPrompt
from deployments.request import GenerationSpec

_ids = itertools.count()


def prompt_for(seq: int = 16, dim: int = 32, cfg: bool = True) -> EncodedPrompt:
    cond = {"encoder_hidden_states": torch.zeros(1, seq, dim)}
    return EncodedPrompt(cond=cond, uncond=dict(cond) if cfg else None)


def gen_spec(model: str, steps: int = 4, height: int = 32, width: int = 48, frames: int = 9, seed: int = 0,
             guidance: float = 6.0, request_id: str | None = None) -> GenerationSpec:
    return GenerationSpec(request_id=request_id or f"r{next(_ids)}", model=model, height=height, width=width,
                          num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, seed=seed)


class ZeroExecutor:
    """A worker stand-in predicting zeros; records each plan's request ids (to test scheduling alone)."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def __call__(self, plan: BatchPlan) -> StepOutput:
        self.steps.append(plan.request_ids)
        preds = {rid: torch.zeros_like(x) for sb in plan.sub_batches for rid, x in zip(sb.request_ids, sb.latents)}
        return StepOutput(predictions=preds)


def config_only(adapter: DiffusionAdapter) -> dict[str, DiffusionAdapter]:
    return {adapter.spec.name: adapter}
