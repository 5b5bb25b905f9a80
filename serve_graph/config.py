"""Typed, validated configuration of the video application.

`serve run configs/*.yaml` passes the `args:` block of an application to
`serve_graph.app.build_video_app`, which validates it once into `VideoAppConfig`.
Every model is frozen afterwards: deployments receive their slice of it and never
mutate it (a changed knob means a redeploy, as in vLLM's `SchedulerConfig`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import SchedulerConfig
from models.spec import ModelSpec

AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
