"""What a client asked for, and the scheduler's tensor-free view of a request in its pool.

`GenerationSpec` is the one validated request (every default filled in) that the
ingress, the job table and the engine share. `RequestMeta` is what the step
scheduler keeps per pooled request: counters and sizes, never tensors. The
latents, the sampler and the prompt embeddings live with the model runner
(`engine.runner`) on the worker's device, from admission to finish.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from models.step_cache import StepCache, computed_steps_left


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
    cache: StepCache = StepCache()
    """The request's step cache (the request's own, else its model's default)."""

    @property
    def uses_cfg(self) -> bool:
        return self.negative_prompt is not None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values, as the job store keeps the spec."""
        return {**asdict(self), "cache": self.cache.model_dump(exclude_none=True)}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "GenerationSpec":
        """The spec `to_json` wrote (a job stored before step caches existed has none: mode none)."""
        return cls(**{**values, "cache": StepCache(**values.get("cache", {}))})


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
    cache: StepCache = StepCache()
    computed_steps: int = 0  # steps done that ran the transformer (the others came from the step cache)
    _schedule: tuple[bool, ...] | None = field(default=None, repr=False)  # per step: runs the transformer
    _computed_from: tuple[int, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cache.enabled:
            self._schedule = self.cache.schedule(self.total_steps, self.expert_switch_step)
            self._computed_from = computed_steps_left(self._schedule)

    def expert_at(self, step: int) -> int:
        """Which expert's forward runs step `step` (0 for one-expert models)."""
        return int(self.expert_switch_step is not None and step >= self.expert_switch_step)

    @property
    def remaining_steps(self) -> int:
        """Steps not scheduled yet."""
        return self.total_steps - self.steps_scheduled

    def computes_at(self, step: int) -> bool:
        """Whether step `step` runs the transformer (else its step cache stands in)."""
        return self._schedule is None or step >= self.total_steps or self._schedule[step]

    @property
    def next_rows(self) -> int:
        """Forward rows of the next step to schedule: `rows`, or 0 for a step its cache stands in for."""
        return self.rows if self.computes_at(self.steps_scheduled) else 0

    @property
    def step_tokens(self) -> int:
        """Tokens this request adds to the forward of the next step to schedule (0 on a cached step)."""
        return self.seq_len * self.next_rows

    @property
    def remaining_computed_steps(self) -> int:
        """Steps not scheduled yet that will run the transformer (a cache that decides inside each step: as many as
        the fraction of its steps done so far that computed)."""
        if self.cache.decided_in_step:
            return round(self.remaining_steps * (self.computed_steps / self.steps_done if self.steps_done else 1.0))
        if self._computed_from is None:
            return self.remaining_steps
        return self._computed_from[min(self.steps_scheduled, self.total_steps)]

    @property
    def remaining_cost(self) -> int:
        """SRPTF's L = (T_total - t) * S, over the steps that compute."""
        return self.remaining_computed_steps * self.seq_len
