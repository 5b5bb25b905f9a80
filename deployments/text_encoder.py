"""TextEncoder: prompts -> conditioning tensors, batched across concurrent requests."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from ray import serve

from api.config import DeploymentResources
from deployments import init_replica
from models import load_adapter
from models.interface import EncodedPrompt
from models.spec import ModelSpec


@dataclass(frozen=True)
class EncodeRequest:
    model: str
    prompt: str
    negative_prompt: str | None  # None: the request runs without classifier-free guidance


class TextEncoderCore:
    def __init__(self, models: list[ModelSpec], device: str = "cpu") -> None:
        self.adapters = {m.name: load_adapter(m, parts=("text",), device=device) for m in models}

    def encode_batch(self, requests: list[EncodeRequest]) -> list[EncodedPrompt]:
        """Encode requests grouped by model, one text-encoder forward per model; keeps input order."""
        by_model: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_model[r.model].append(i)
        out: list[EncodedPrompt | None] = [None] * len(requests)
        for model, indices in by_model.items():
            encoded = self.adapters[model].encode([requests[i].prompt for i in indices],
                                                  [requests[i].negative_prompt for i in indices])
            for i, e in zip(indices, encoded):
                out[i] = e
        return out  # type: ignore[return-value]


@serve.deployment(max_ongoing_requests=256)
class TextEncoder:
    def __init__(self, models: list[ModelSpec], resources: DeploymentResources) -> None:
        res = init_replica(resources)
        self.core = TextEncoderCore(models, device=res.device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, requests: list[EncodeRequest]) -> list[EncodedPrompt]:
        return await asyncio.to_thread(self.core.encode_batch, requests)
