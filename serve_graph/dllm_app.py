"""Builder of the diffusion-LM application: `serve run` entry point `serve_graph.dllm_app:build_dllm_app`.

    DllmIngress (OpenAI API, tokenizer, validation) ──► DllmScheduler (step scheduler core + dLLM runner, one device)
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from api.dllm_config import DllmAppConfig
from deployments.dllm.ingress import DllmIngress
from deployments.dllm.scheduler import DllmScheduler


def build_dllm_app(args: dict[str, Any]) -> Application:
    config = DllmAppConfig(**args)
    for model in config.models:
        model.resolved_source()  # a missing checkpoint fails the deploy here, with the command that writes it
    res = config.step_scheduler
    scheduler = DllmScheduler.options(
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
    ).bind(config.models, config.scheduler, res)
    return DllmIngress.options(
        ray_actor_options={"num_cpus": config.ingress.num_cpus, "num_gpus": 0},
    ).bind(config.models, config.max_prompt_tokens, scheduler)
