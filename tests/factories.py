"""Factory helpers for engine tests: tensor-free requests for the scheduler, an engine of tiny real models."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from engine.config import BudgetConfig
from engine.engine import EngineCore, LocalExecutor
from engine.messages import NewRequest, VideoStepResult
from engine.policies import make_policy
from engine.request import GenerationSpec, RequestMeta
from engine.runner import ModelRunner
from engine.scheduler import StepSchedulerCore
from models import load_adapter
from models.interface import EncodedPrompt
from models.spec import ModelSpec
from models.step_cache import StepCache

_ids = itertools.count()


def new_request(steps: int = 4, seq_len: int = 100, cfg: bool = True, model: str = "cog",
                request_id: str | None = None) -> NewRequest:
    """A request as the scheduler sees it: sizes only (no prompt tensors)."""
    return NewRequest(request_id=request_id or f"r{next(_ids)}", model=model, latent_shape=(1,), seq_len=seq_len,
                      row_tokens=(seq_len,) * (2 if cfg else 1), seed=0, num_steps=steps,
                      guidance_scale=6.0 if cfg else 1.0, prompt=None, cfg=cfg)


def gen_spec(model: str, steps: int = 4, height: int = 32, width: int = 48, frames: int = 9, seed: int = 0,
             guidance: float = 6.0, prompt: str = "a cat", guidance_2: float | None = None,
             cache: StepCache = StepCache()) -> GenerationSpec:
    return GenerationSpec(model=model, prompt=prompt, negative_prompt="" if guidance > 1 else None, height=height,
                          width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                          seed=seed, fps=8, guidance_scale_2=guidance_2, cache=cache)


class Engine:
    """The engine (`EngineCore`) over a model runner of tiny real models, stepped inline (no Ray). Steps fill the
    budget (batching "fill"): these tests pack requests on purpose, whatever this machine's measured step cost says."""

    def __init__(self, specs: list[ModelSpec], policy: str = "fifo", max_batch_size: int = 8) -> None:
        self.adapters = {s.name: load_adapter(s, parts=()) for s in specs}
        self.engine = EngineCore(StepSchedulerCore(make_policy(policy), BudgetConfig(max_batch_size=max_batch_size),
                                                   batching="fill"))
        self.core = self.engine.scheduler
        self.runner = ModelRunner({s.name: load_adapter(s, parts=("transformer",)) for s in specs})
        self.executor = LocalExecutor(self.runner)
        self.latents: dict[str, torch.Tensor] = {}
        self.done: dict[str, RequestMeta] = {}
        self.results: list[VideoStepResult] = []

    def admit(self, request_id: str, spec: GenerationSpec, prompt: EncodedPrompt) -> RequestMeta:
        return self.engine.admit(NewRequest.from_spec(request_id, spec, prompt, self.adapters[spec.model]))

    def step(self) -> None:
        stepped = self.engine.run_local(self.executor)
        if stepped is None:
            return
        _, executed, ended = stepped
        self.results.append(executed.result)
        for end in ended:
            self.done[end.meta.request_id] = end.meta
            if end.output is not None:
                self.latents[end.meta.request_id] = end.output

    def run(self) -> None:
        while self.core.pool:
            self.step()


def assert_joined_late_equals_alone(spec: ModelSpec, target: tuple[GenerationSpec, EncodedPrompt],
                                    *others: tuple[GenerationSpec, EncodedPrompt]) -> None:
    """The target alone equals the target admitted one step after `others` (other shapes, other timesteps) started,
    one packed forward holding two shapes or more (fp32, 1e-5)."""
    alone = Engine([spec])
    alone.admit("t", *target)
    alone.run()
    batched = Engine([spec])
    for i, other in enumerate(others):
        batched.admit(f"o{i}", *other)
    batched.step()
    batched.admit("t", *target)
    batched.run()
    assert any(r.shapes >= 2 and r.forwards == 1 for r in batched.results)
    torch.testing.assert_close(batched.latents["t"], alone.latents["t"], rtol=0, atol=1e-5)


def noise_picture(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    """An RGB noise picture, the same for the same seed: an image-to-video request's first frame (of another size
    than the tests' requests, so the resize path runs)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
