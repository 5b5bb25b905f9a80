"""Typed, validated configuration of the video application.

`serve run configs/*.yaml` passes the `args:` block of an application to
`serve_graph.app.build_video_app`, which validates it once into `VideoAppConfig`.
Every model is frozen afterwards: deployments receive their slice of it and never
mutate it (a changed knob means a redeploy, as in vLLM's `SchedulerConfig`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelFamily = Literal["cogvideox", "mochi", "wan", "sd3"]
ResolutionName = Literal["240p", "360p", "480p", "720p"]
AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    """One served diffusion model and the request range it accepts."""

    name: str = Field(description="Model id clients pass as `model` (and listed by GET /v1/models).")
    family: ModelFamily = Field(description="diffusers pipeline family that builds and runs the model.")
    source: str = Field(
        default="tiny",
        description="'tiny' builds random weights from a small config (no download); otherwise a local "
        "directory or hub id of a diffusers checkpoint, loaded with `from_pretrained`.",
    )
    weights_seed: int = Field(default=0, description="Seed of the tiny variant's random weights.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    resolution_heights: dict[ResolutionName, int] = Field(
        default={"240p": 240, "360p": 360, "480p": 480, "720p": 720},
        description="Pixel height each resolution name renders at; the keys are the allowed names. "
        "The CPU config maps them to small heights so tiny models stay fast.",
    )
    max_image_side: int = Field(default=1024, ge=16, description="Largest width/height of an image request.")
    min_frames: int = Field(default=1, ge=1)
    max_frames: int = Field(default=49, ge=1, description="Most frames a video request may ask for.")
    default_frames: int = Field(default=9, ge=1)
    default_steps: int = Field(default=50, ge=1, le=200)
    default_guidance_scale: float = Field(default=6.0, ge=0.0, le=50.0)
    default_fps: int = Field(default=8, ge=1, le=120)
    default_negative_prompt: str = ""
    max_sequence_length: int = Field(
        default=226, ge=1, description="Text tokens fed to the transformer (longer prompts are truncated)."
    )

    @model_validator(mode="after")
    def _check_frames(self) -> "ModelSpec":
        if not self.min_frames <= self.default_frames <= self.max_frames:
            raise ValueError("default_frames must lie in [min_frames, max_frames]")
        return self


class BudgetConfig(_Frozen):
    """What one denoising step may hold (see deployments.step_scheduler)."""

    max_batch_size: int = Field(default=8, ge=1, description="Most requests in one step.")
    max_batch_tokens: int = Field(
        default=65536,
        ge=1,
        description="Most transformer tokens in one step: sum over picked requests of sequence length x "
        "forward rows (2 with classifier-free guidance). A lone request over it still runs.",
    )


class SchedulerConfig(_Frozen):
    policy: Literal["fifo", "srptf"] = "srptf"
    starvation_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="If set, a request not stepped for this long is served before every other "
        "(guards SRPTF against starving long requests under a stream of short ones).",
    )
    budget: BudgetConfig = BudgetConfig()
    max_pool_size: int = Field(
        default=256, ge=1, description="Requests admitted (queued + running); more answer HTTP 429."
    )


class LimitsConfig(_Frozen):
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_retained_jobs: int = Field(
        default=1000, ge=1, description="Finished jobs (and their videos) kept in memory; oldest evicted first."
    )


class DeploymentResources(_Frozen):
    """Ray resources and parallelism of one deployment."""

    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads in the replica.")
    device: str = Field(default="cpu", description="torch device the deployment's model runs on.")


class VideoAppConfig(_Frozen):
    """The `args:` of the video application."""

    models: list[ModelSpec] = Field(min_length=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    limits: LimitsConfig = LimitsConfig()
    ingress: DeploymentResources = DeploymentResources(num_cpus=0.1)
    text_encoder: DeploymentResources = DeploymentResources(num_cpus=0.25)
    step_scheduler: DeploymentResources = DeploymentResources(num_cpus=0.1)
    dit_worker: DeploymentResources = DeploymentResources(num_cpus=1)
    vae_decoder: DeploymentResources = DeploymentResources(num_cpus=0.5)

    @model_validator(mode="after")
    def _unique_names(self) -> "VideoAppConfig":
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self
