"""Typed messages between the step scheduler and the model runner (vLLM v1's new / cached / finished split).

- `NewRequest` travels once, in the first plan that schedules the request: the
  runner creates its latents and sampler on its device and keeps its embeddings.
- `StepPlan` is every later step's payload: ids in packed order with the step
  index each runs, ids to free, the Brick plans. Ids and small integers only (~150
  bytes per request), where the previous design shipped every latent and embedding
  per step.
- `StepResult` answers with the ids stepped, per-request errors, and the outputs
  of requests that finished in this step; each runner answers with its own kind
  (`VideoStepResult`: final latents, which cross processes exactly once, on their
  way to the VAE; `DllmStepResult`: response tokens and the prefixes that grew).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch

from attention.plan import BrickPlan
from engine.request import GenerationSpec
from models.dllm.decoding import DecodeParams
from models.interface import EncodedPrompt
from models.step_cache import StepCache

if TYPE_CHECKING:  # only the type: importing models.base loads diffusers
    from models.base import DiffusionAdapter


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    model: str
    latent_shape: tuple[int, ...]
    seq_len: int  # transformer tokens of one forward row (latent patches + text), for the budget and SRPTF
    row_tokens: tuple[int, ...]  # self-attention tokens of each forward row ([uncond, cond]), for the Brick planner
    seed: int
    num_steps: int
    guidance_scale: float
    prompt: EncodedPrompt | None  # None only where no runner exists (the simulator)
    cfg: bool
    guidance_scale_2: float | None = None  # the low-noise expert's guidance (two-expert models only)
    expert_switch_step: int | None = None  # two-expert models: the first step run by the second expert
    fps: int | None = None  # the video's frame rate, for models conditioned on it (LTX); None: the model's default
    cache: StepCache = StepCache()  # the request's step cache: which steps run the transformer

    @classmethod
    def from_spec(cls, request_id: str, spec: GenerationSpec, prompt: EncodedPrompt | None,
                  adapter: DiffusionAdapter) -> "NewRequest":
        """The engine's view of a validated request; `adapter` needs only its configs (parts=())."""
        shape = adapter.latent_shape(spec.height, spec.width, spec.num_frames)
        seq_len = adapter.geometry.seq_len(spec.height, spec.width, spec.num_frames)
        rows = prompt.rows_in_order if prompt is not None else [None] * (2 if spec.uses_cfg else 1)
        return cls(request_id=request_id, model=spec.model, latent_shape=shape, seq_len=seq_len,
                   row_tokens=tuple(adapter.row_tokens(shape, cond) if cond is not None else seq_len for cond in rows),
                   seed=spec.seed,
                   num_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale, prompt=prompt,
                   cfg=spec.uses_cfg, guidance_scale_2=spec.guidance_scale_2, fps=spec.fps, cache=spec.cache,
                   expert_switch_step=adapter.expert_switch_step(spec.num_inference_steps, shape))

    def guidance_at(self, expert: int) -> float:
        """The CFG scale of a step run by `expert` (WanPipeline's guidance_scale / guidance_scale_2)."""
        return self.guidance_scale_2 if expert == 1 and self.guidance_scale_2 is not None else self.guidance_scale

    def __post_init__(self) -> None:
        if self.prompt is not None and (self.prompt.uncond is not None) != self.cfg:
            raise ValueError(f"{self.request_id}: cfg={self.cfg} but the prompt "
                             f"{'has' if self.prompt.uncond is not None else 'lacks'} an unconditional row")
        if len(self.row_tokens) != self.rows:
            raise ValueError(f"{self.request_id}: {len(self.row_tokens)} row token counts for {self.rows} rows")

    @property
    def rows(self) -> int:
        """Forward rows per step: 2 with classifier-free guidance (uncond + cond), else 1."""
        return 2 if self.cfg else 1


@dataclass(frozen=True)
class NewDllmRequest:
    """A diffusion-LM request, sent once like `NewRequest`: its prompt tokens and decoding knobs. One forward row
    of prompt + response tokens; SRPTF's remaining cost is remaining steps x that length."""

    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    params: DecodeParams
    rows = 1
    expert_switch_step = None  # one network
    cache = StepCache()  # every step computes

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def row_tokens(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def num_steps(self) -> int:
        return self.params.steps


@dataclass(frozen=True)
class ScheduledStep:
    request_id: str
    step_index: int  # the runner checks it against its own counter
    model: str
    rows: int  # forward rows (2 with CFG): with `model`, where this request's rows sit in the Brick plans
    expert: int  # which expert's forward runs this step (0; Wan 2.2 A14B: 1 below the boundary timestep)

    @property
    def computed(self) -> bool:
        """False for a step the request's step cache stands in for: it has no rows in the forward."""
        return self.rows > 0


@dataclass(frozen=True)
class StepPlan:
    """One step, the same for every rank of the worker group.

    `rings` has one Brick plan per model: its assignments index that model's forward
    rows in packed order (a request with CFG has two rows, uncond then cond).
    """

    step_id: int
    new_requests: tuple[NewRequest, ...]
    scheduled: tuple[ScheduledStep, ...]  # packed order
    free: tuple[str, ...]  # cancelled requests whose state the runner drops
    num_tokens: int
    rings: Mapping[str, BrickPlan] = field(default_factory=dict)

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.scheduled]


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What any runner answers for a plan, and all the scheduler core reads of it: the ids stepped, per-request
    errors, and the outputs of requests that ended in this step. Each runner answers with its own subclass."""

    step_id: int
    stepped: tuple[str, ...]
    errors: Mapping[str, str] = field(default_factory=dict)
    finished: Mapping[str, object] = field(default_factory=dict)  # request id -> its final output
    forwards: int = 0  # forwards run (1 per model present; more only when isolating a fault)
    skipped_in_step: tuple[str, ...] = ()  # stepped requests whose cache skipped blocks, decided in the step
    forward_seconds: float = 0.0
    idle_before_seconds: float = 0.0  # runner idle time between the previous step's end and this one's start

    @classmethod
    def all_stepped(cls, plan: StepPlan) -> "StepResult":
        """Every scheduled request ran: what the scheduler sees of a step when no model runs (simulator, tests)."""
        return cls(step_id=plan.step_id, stepped=tuple(plan.request_ids))


@dataclass(frozen=True, kw_only=True)
class VideoStepResult(StepResult):
    """`ModelRunner`'s answer: `finished` holds final latents (1, *shape), which cross processes once, to the VAE."""

    finished: Mapping[str, torch.Tensor] = field(default_factory=dict)
    shapes: int = 0  # distinct latent shapes packed in this step
    ring_bytes: int = 0  # KV bytes this rank sent to its ring neighbours


@dataclass(frozen=True, kw_only=True)
class DllmStepResult(StepResult):
    """`DllmRunner`'s answer: `finished` holds response token ids (before the first stop token)."""

    finished: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    prefixes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # response tokens fixed so far, for
    # requests whose unmasked prefix grew in this step (what a stream may send)
