"""Typed, validated configuration of the video application.

`serve run configs/*.yaml` passes the `args:` block of an application to
`serve_graph.app.build_video_app`, which validates it once into `VideoAppConfig`.
Every model is frozen afterwards: deployments receive their slice of it and never
mutate it (a changed knob means a redeploy, as in vLLM's `SchedulerConfig`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.frozen import FrozenModel
from engine.config import SchedulerConfig
from models.spec import ModelSpec


class LimitsConfig(FrozenModel):
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_backlog_s: float | None = Field(
        default=600, gt=0, description="Admission by work: a new job is refused (HTTP 429, Retry-After) while the "
        "work already admitted - the pool's remaining token-steps at the rate the scheduler measured, plus the VAE "
        "decoder's queue at its measured seconds per latent element - would take longer than this; None: only the "
        "pool's request count (scheduler.max_pool_size) bounds admission.")


class StoreConfig(FrozenModel):
    """Where jobs and their results live (deployments.store): outside every process, so restarts lose nothing."""

    data_dir: str = Field(default=".data", description="Default home of the SQLite job store and the blobs; a "
                          "relative path is taken from the working directory of `serve run`.")
    jobs_url: str | None = Field(
        default=None, description="sqlite:///PATH or postgresql://... ($VARS expanded, so a password can come from "
        "the environment); default sqlite:///<data_dir>/jobs.db. Replicas on several nodes need PostgreSQL.")
    blobs_url: str | None = Field(
        default=None, description="Directory or fsspec URL (s3://bucket/prefix) of the videos and images ($VARS "
        "expanded); default <data_dir>/blobs.")
    ttl_s: float = Field(default=7 * 86400, gt=0, description="Finished jobs and their files are deleted this long "
                         "after they end.")
    sweep_interval_s: float = Field(default=60, gt=0, description="How often the job runner deletes expired jobs and "
                                    "adopts queued jobs nobody is driving.")
    max_job_restarts: int = Field(default=2, ge=0, description="Times a job is re-admitted after the process driving "
                                  "it (or its scheduler replica) died, before it fails with that reason.")

    def resolved_jobs_url(self) -> str:
        if self.jobs_url:
            return os.path.expandvars(self.jobs_url)
        return f"sqlite:///{Path(self.data_dir).resolve() / 'jobs.db'}"

    def resolved_blobs_url(self) -> str:
        if self.blobs_url:
            return os.path.expandvars(self.blobs_url)
        return str(Path(self.data_dir).resolve() / "blobs")


class DeploymentResources(FrozenModel):
    """Ray resources and parallelism of one deployment."""

    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads in the replica.")
    device: str = Field(default="cpu", description="torch device the deployment's model runs on.")


class ReplicaRange(FrozenModel):
    """Serve autoscaling of the step scheduler: each replica owns one worker group, so scaling out adds groups."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(
        default=32, gt=0, description="Pooled requests per replica above which Serve adds a replica.")

    def autoscaling_config(self) -> dict[str, float]:
        return self.model_dump()


class WorkerGroupConfig(FrozenModel):
    """The DiT worker group of each step-scheduler replica: `ranks` actors in the replica's placement group."""

    ranks: int = Field(default=1, ge=1, le=8, description="Ranks (GPUs) per group; Brick rings of 1..ranks.")
    num_cpus_per_rank: float = Field(default=1, ge=0)
    num_gpus_per_rank: float = Field(default=0, ge=0, description="GPU share per rank; above 0.5 so that no two "
                                     "ranks share a GPU (NCCL needs a GPU each).")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch.set_num_threads in each rank (default: Ray's OMP_NUM_THREADS, "
        "num_cpus_per_rank rounded down, at least 1). More threads than cores the rank really gets makes CPU "
        "steps several times slower (OpenMP threads wait on descheduled peers).")
    device: str = Field(default="cpu", description="'cpu' or 'cuda'; each rank's torch device.")
    backend: Literal["gloo", "nccl"] = Field(default="gloo", description="torch.distributed backend of the group.")
    timeout_s: float = Field(
        default=60, gt=0, description="Process-group timeout: a rank stuck this long in a collective fails the step "
        "(a killed rank usually fails it at once: its peers see the connection close).")

    @model_validator(mode="after")
    def _nccl_needs_gpus(self) -> "WorkerGroupConfig":
        if self.backend == "nccl" and (self.num_gpus_per_rank <= 0.5 or not self.device.startswith("cuda")):
            raise ValueError("backend nccl needs device 'cuda' and num_gpus_per_rank > 0.5 (one rank per GPU)")
        return self

    def bundles(self, replica_cpus: float) -> list[dict[str, float]]:
        """The replica's placement group: bundle i holds rank i; the replica actor itself sits in bundle 0."""
        def bundle(extra_cpus: float) -> dict[str, float]:
            out = {"CPU": self.num_cpus_per_rank + extra_cpus}
            return out | ({"GPU": self.num_gpus_per_rank} if self.num_gpus_per_rank else {})
        return [bundle(replica_cpus)] + [bundle(0) for _ in range(self.ranks - 1)]


class AuthConfig(FrozenModel):
    """Optional API keys (deployments.api_keys); neither set: the API is open."""

    keys_file: str | None = Field(default=None, description="File of `name:token` lines on the serving nodes.")
    keys_env: str | None = Field(default=None, description="Environment variable with `name:token,...` pairs.")


class VideoAppConfig(FrozenModel):
    """The `args:` of the video application."""

    models: list[ModelSpec] = Field(min_length=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    limits: LimitsConfig = LimitsConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    ingress: DeploymentResources = DeploymentResources(num_cpus=0.1)
    ingress_replicas: int = Field(default=2, ge=1, description="Any replica answers any job (state is in the store).")
    job_runner: DeploymentResources = DeploymentResources(num_cpus=0.05)
    text_encoder: DeploymentResources = DeploymentResources(num_cpus=0.25)
    step_scheduler: DeploymentResources = DeploymentResources(num_cpus=0.1)
    step_scheduler_replicas: ReplicaRange = ReplicaRange()
    worker_group: WorkerGroupConfig = WorkerGroupConfig()
    vae_decoder: DeploymentResources = DeploymentResources(num_cpus=0.5)
    decode_concurrency: int = Field(
        default=1, ge=1, le=64, description="Requests the VAE decoder replica decodes at once; the rest wait in the "
        "scheduler policy's order: on CPU as many as there are cores (each decode runs on one thread and takes a "
        "rank's core, see decode_displaces_ranks); 1 on a GPU whose VAE saturates it.")
    decode_displaces_ranks: int = Field(
        default=0, ge=0, le=8, description="Worker-group ranks whose resources one running decode takes: 1 on a CPU "
        "machine where the decoder's thread shares the ranks' cores (while decodes run the scheduler plans steps on "
        "the remaining ranks, at least one, so a job's last stage is not starved by the others' first), 0 where the "
        "decoder has a device of its own.")

    @model_validator(mode="after")
    def _unique_names(self) -> "VideoAppConfig":
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self
