"""Factory helpers for engine tests: tensor-free requests for the scheduler, an engine of tiny real models."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from engine.config import BudgetConfig
from engine.messages import NewRequest, StepResult
from engine.policies import make_policy
from engine.request import GenerationSpec, RequestMeta
from engine.runner import ModelRunner
from engine.scheduler import StepSchedulerCore
from models import load_adapter
from models.interface import EncodedPrompt
from models.spec import ModelSpec

_ids = itertools.count()


def new_request(steps: int = 4, seq_len: int = 100, cfg: bool = True, model: str = "cog",
                request_id: str | None = None) -> NewRequest:
    """A request as the scheduler sees it: sizes only (no prompt tensors)."""
    return NewRequest(request_id=request_id or f"r{next(_ids)}", model=model, latent_shape=(1,), seq_len=seq_len,
                      row_tokens=(seq_len,) * (2 if cfg else 1), seed=0, num_steps=steps,
                      guidance_scale=6.0 if cfg else 1.0, prompt=None, cfg=cfg)


def gen_spec(model: str, steps: int = 4, height: int = 32, width: int = 48, frames: int = 9, seed: int = 0,
             guidance: float = 6.0, prompt: str = "a cat", guidance_2: float | None = None) -> GenerationSpec:
    return GenerationSpec(model=model, prompt=prompt, negative_prompt="" if guidance > 1 else None, height=height,
                          width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                          seed=seed, fps=8, guidance_scale_2=guidance_2)


class Engine:
    """Scheduler core + model runner of tiny real models, stepped synchronously (no Ray)."""

    def __init__(self, specs: list[ModelSpec], policy: str = "fifo", max_batch_size: int = 8) -> None:
        self.adapters = {s.name: load_adapter(s, parts=()) for s in specs}
        self.core = StepSchedulerCore(make_policy(policy), BudgetConfig(max_batch_size=max_batch_size))
        self.runner = ModelRunner({s.name: load_adapter(s, parts=("transformer",)) for s in specs})
        self.latents: dict[str, torch.Tensor] = {}
        self.done: dict[str, RequestMeta] = {}
        self.results: list[StepResult] = []

    def admit(self, request_id: str, spec: GenerationSpec, prompt: EncodedPrompt) -> RequestMeta:
        return self.core.admit(NewRequest.from_spec(request_id, spec, prompt, self.adapters[spec.model]))

    def step(self) -> None:
        plan = self.core.schedule()
        if plan is None:
            return
        result = self.runner.execute(plan)
        self.core.postprocess(plan, result)
        self.latents.update(result.finished)
        self.results.append(result)
        self.done.update((m.request_id, m) for m in self.core.pop_done())

    def run(self) -> None:
        while self.core.pool:
            self.step()


def assert_joined_late_equals_alone(spec: ModelSpec, target: tuple[GenerationSpec, EncodedPrompt],
                                    other: tuple[GenerationSpec, EncodedPrompt]) -> None:
    """The target alone equals the target admitted one step after `other` (another shape, other timesteps) started,
    one packed forward holding both shapes (fp32, 1e-5)."""
    alone = Engine([spec])
    alone.admit("t", *target)
    alone.run()
    batched = Engine([spec])
    batched.admit("a", *other)
    batched.step()
    batched.admit("t", *target)
    batched.run()
    assert any(r.shapes == 2 and r.forwards == 1 for r in batched.results)
    torch.testing.assert_close(batched.latents["t"], alone.latents["t"], rtol=0, atol=1e-5)


def noise_picture(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    """An RGB noise picture, the same for the same seed: an image-to-video request's first frame (of another size
    than the tests' requests, so the resize path runs)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
