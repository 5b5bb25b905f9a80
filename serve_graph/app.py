"""Application builders: the `import_path` targets of the Serve configs.

    applications:
      - name: video
        import_path: serve_graph.app:build_video_app
        args: {...}            # validated into api.config.VideoAppConfig
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from api.config import DeploymentResources, VideoAppConfig
from deployments.job_runner import JobRunner
from deployments.step_scheduler import StepScheduler
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VaeDecoder
from deployments.video_ingress import VideoIngress


def _actor_options(res: DeploymentResources) -> dict[str, Any]:
    return {"ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}}


def build_video_app(args: dict[str, Any]) -> Application:
    """VideoIngress replicas -> JobRunner -> TextEncoder, StepScheduler (+ its worker group), VaeDecoder; jobs and
    results in the job and blob stores (see docs/architecture.md's graph)."""
    config = VideoAppConfig(**args)
    models = config.models  # the validated configs are what every replica receives

    def bind(deployment: Any, res: DeploymentResources, *init_args: Any) -> Application:
        return deployment.options(**_actor_options(res)).bind(*init_args)

    group = config.worker_group
    # Paths resolved here, in `serve run`'s working directory, once for every replica.
    store = config.store.model_copy(update={"jobs_url": config.store.resolved_jobs_url(),
                                            "blobs_url": config.store.resolved_blobs_url()})
    text_encoder = bind(TextEncoder, config.text_encoder, models, config.text_encoder)
    vae = bind(VaeDecoder, config.vae_decoder, models, config.vae_decoder, store.blobs_url,
               config.scheduler.policy, config.decode_concurrency)
    scheduler = StepScheduler.options(
        ray_actor_options={"num_cpus": config.step_scheduler.num_cpus},
        placement_group_bundles=group.bundles(config.step_scheduler.num_cpus),
        placement_group_strategy="STRICT_PACK" if group.backend == "nccl" else "PACK",
        autoscaling_config=config.step_scheduler_replicas.autoscaling_config(),
    ).bind(models, config.scheduler, group, text_encoder, vae, config.decode_displaces_ranks)
    runner = bind(JobRunner, config.job_runner, store, text_encoder, scheduler, vae)
    return VideoIngress.options(num_replicas=config.ingress_replicas, **_actor_options(config.ingress)).bind(
        models, config.limits, store, config.auth, config.scheduler.max_pool_size,
        text_encoder, scheduler, vae, runner)
