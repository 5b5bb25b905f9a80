"""Application builders: the `import_path` targets of the Serve configs.

    applications:
      - name: video
        import_path: serve_graph.app:build_video_app
        args: {...}            # validated into serve_graph.config.VideoAppConfig
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.dit_worker import DiTWorker
from deployments.step_scheduler import StepScheduler
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VaeDecoder
from deployments.video_ingress import VideoIngress
from serve_graph.config import DeploymentResources, VideoAppConfig


def _actor_options(res: DeploymentResources) -> dict[str, Any]:
    return {"ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}}


def build_video_app(args: dict[str, Any]) -> Application:
    """VideoIngress -> TextEncoder, StepScheduler -> DiTWorker, VaeDecoder (see README's graph)."""
    config = VideoAppConfig(**args)
    models = [m.model_dump() for m in config.models]

    def bind(deployment: Any, res: DeploymentResources, *init_args: Any) -> Application:
        return deployment.options(**_actor_options(res)).bind(*init_args)

    worker = bind(DiTWorker, config.dit_worker, models, config.dit_worker.model_dump())
    scheduler = bind(StepScheduler, config.step_scheduler, models, config.scheduler.model_dump(), worker)
    text_encoder = bind(TextEncoder, config.text_encoder, models, config.text_encoder.model_dump())
    vae = bind(VaeDecoder, config.vae_decoder, models, config.vae_decoder.model_dump())
    return bind(VideoIngress, config.ingress, models, config.limits.model_dump(), config.scheduler.max_pool_size,
                text_encoder, scheduler, vae)

