"""The state of one generation request while it lives in the step scheduler's pool."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from deployments.models.base import EncodedPrompt


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # admitted, no step run yet
    RUNNING = "running"  # at least one step run
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


@dataclass(frozen=True)
class GenerationSpec:
    """What a client asked for, after validation (sizes in pixels)."""

    request_id: str
    model: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class RequestState:
    """A request in the pool: latents, its own diffusers sampler, and counters.

    The sampler is per request because diffusers schedulers are stateful
    (`_step_index`, multistep solver history). `seq_len` is the transformer's
    token count for one forward row (latent patches + text tokens).
    """

    spec: GenerationSpec
    latents: torch.Tensor  # (1, *latent_shape)
    sampler: Any
    prompt: EncodedPrompt
    seq_len: int
    total_steps: int  # len(sampler.timesteps), fixed at admission (read on every policy comparison)
    arrival_time: float
    status: RequestStatus = RequestStatus.WAITING
    steps_done: int = 0
    last_scheduled_time: float | None = None
    first_step_time: float | None = None
    finish_time: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    sampler_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def remaining_steps(self) -> int:
        return self.total_steps - self.steps_done

    @property
    def rows(self) -> int:
        """Forward rows per step: 2 with classifier-free guidance (uncond + cond), else 1."""
        return 2 if self.prompt.uncond is not None else 1

    @property
    def step_tokens(self) -> int:
        """Tokens this request adds to one step's forward."""
        return self.seq_len * self.rows

    @property
    def remaining_cost(self) -> int:
        """SRPTF's L = (T_total - t) * S."""
        return self.remaining_steps * self.seq_len

    @property
    def current_timestep(self) -> torch.Tensor:
        return self.sampler.timesteps[self.steps_done]

    @property
    def model_input(self) -> torch.Tensor:
        """Latents as the transformer takes them at this step (some samplers rescale them)."""
        scale = getattr(self.sampler, "scale_model_input", None)  # flow-matching samplers have none
        return scale(self.latents, self.current_timestep) if scale is not None else self.latents

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys can share one dense forward."""
        cond_shapes = tuple((k, tuple(v.shape)) for k, v in sorted(self.prompt.cond.items()))
        return (self.spec.model, tuple(self.latents.shape), cond_shapes)
