"""What a client asked for, and the scheduler's tensor-free view of a request in its pool.

`GenerationSpec` is the one validated request (every default filled in) that the
ingress, the job table and the engine share. `RequestMeta` is what the step
scheduler keeps per pooled request: counters and sizes, never tensors. The
latents, the sampler and the prompt embeddings live with the model runner
(`engine.runner`) on the worker's device, from admission to finish.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    """A validated generation request (sizes in pixels); `negative_prompt` None means no CFG."""

    model: str
    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    guidance_scale_2: float | None = None
    """The low-noise expert's guidance of a two-expert model (Wan 2.2 A14B); None for one-expert models."""
    input_image: str | None = None
    """Image-to-video: the digest of the input image's bytes (stored beside the job); None for text-only models."""

    @property
    def uses_cfg(self) -> bool:
        return self.negative_prompt is not None


@dataclass(eq=False)
class RequestMeta:
    """A request in the scheduler's pool: sizes and counters only.

    `steps_scheduled` runs ahead of `steps_done` while a step is in flight: the
    scheduler plans step k+1 before step k's result is back, assuming step k succeeds.
    `seq_len` is the transformer's token count for one forward row (latent patches +
    text tokens); `rows` is 2 with classifier-free guidance, else 1.
    """

    request_id: str
    model: str
    seq_len: int
    rows: int
    row_tokens: tuple[int, ...]  # self-attention tokens per forward row, for the Brick planner
    total_steps: int
    arrival_time: float
    status: RequestStatus = RequestStatus.WAITING
    steps_done: int = 0
    steps_scheduled: int = 0
    sent: bool = False  # the runner holds this request's state
    last_scheduled_time: float | None = None
    first_step_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    restarts: int = 0  # times restarted from step 0 because the worker group lost its state
    expert_switch_step: int | None = None  # two-expert models: steps from this one on run the second expert

    def expert_at(self, step: int) -> int:
        """Which expert's forward runs step `step` (0 for one-expert models)."""
        return int(self.expert_switch_step is not None and step >= self.expert_switch_step)

    @property
    def remaining_steps(self) -> int:
        """Steps not scheduled yet."""
        return self.total_steps - self.steps_scheduled

    @property
    def step_tokens(self) -> int:
        """Tokens this request adds to one step's forward."""
        return self.seq_len * self.rows

    @property
    def remaining_cost(self) -> int:
        """SRPTF's L = (T_total - t) * S."""
        return self.remaining_steps * self.seq_len
