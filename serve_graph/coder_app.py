"""Builder of the coder LLM application: `serve run` entry point `serve_graph.coder_app:build_coder_app`.

The graph is Ray Serve LLM's: an OpenAI ingress (`CoderIngress`) in front of
vLLM replicas (`CoderLLMServer`). This module only turns the validated
`CoderAppConfig` into an `LLMConfig` and binds the two deployments.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from api.coder_config import CoderAppConfig
from common.weight_sync import EXTENSION_CLS


def make_llm_config(config: CoderAppConfig) -> LLMConfig:
    """The `ray.serve.llm` config of the vLLM replicas, DeepCoder's sampling defaults included."""
    defaults = config.sampling_defaults
    generation = {"temperature": defaults.temperature, "top_p": defaults.top_p}
    if defaults.max_tokens is not None:
        generation["max_new_tokens"] = defaults.max_tokens
    engine_kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        # "vllm" ignores a checkpoint's generation_config.json so the defaults are exactly these.
        "generation_config": "vllm",
        "override_generation_config": generation,
        # Every worker can take in-memory weights from a trainer (`CoderLLMServer.update_weights`).
        "worker_extension_cls": EXTENSION_CLS,
        **config.engine_kwargs,
    }
    return LLMConfig(
        model_loading_config={"model_id": config.model_id, "model_source": config.resolved_model_source()},
        accelerator_config={"kind": config.accelerator},
        engine_kwargs=engine_kwargs,
        deployment_config=dict(config.server),
        placement_group_config=dict(config.placement_group) if config.placement_group else None,
        runtime_env={"env_vars": dict(config.env_vars)} if config.env_vars else None,
        server_cls="deployments.coder.server:CoderLLMServer",
    )


def build_coder_app(args: dict[str, Any]) -> Application:
    # Internal helpers of ray.serve.llm that `build_openai_app` itself uses (Ray is pinned).
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    from deployments.coder.ingress import CoderIngress, coder_ingress_class

    config = CoderAppConfig.model_validate(args)
    llm_config = make_llm_config(config)
    ingress_options = maybe_apply_llm_deployment_config_defaults(
        CoderIngress.get_deployment_options([llm_config]), dict(config.ingress)
    )
    return serve.deployment(coder_ingress_class(), **ingress_options).bind(
        llm_deployments={config.model_id: build_llm_deployment(llm_config)},
        model_cards={config.model_id: to_model_metadata(config.model_id, llm_config)},
        max_model_len=config.max_model_len,
        default_max_tokens=config.sampling_defaults.max_tokens,
        fold_system_prompt=config.fold_system_prompt,
        admin_token_env=config.admin_token_env,
    )
