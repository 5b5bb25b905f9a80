"""Typed, validated configuration of the coder LLM application.

`serve run configs/*.yaml` hands the `args:` block of the coder app to
`serve_graph.coder_app.build_coder_app`, which validates it once into
`CoderAppConfig` and translates it into a `ray.serve.llm.LLMConfig`. Only what
this project adds is modelled here (DeepCoder's sampling defaults, system-prompt
folding, admin auth); every other vLLM knob passes through `engine_kwargs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from api.serve_configs import PROJECT_ROOT
from common.frozen import FrozenModel


class SamplingDefaults(FrozenModel):
    """Sampling applied when a client leaves a field unset (DeepCoder's model card values)."""

    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Default response budget; None means 'up to the model length' (vLLM caps any value there).",
    )


class CoderAppConfig(FrozenModel):
    model_id: str = Field(description="Name clients pass as `model` and GET /v1/models lists.")
    model_source: str = Field(
        description="Local checkpoint directory or hub id. A relative path is looked up in the "
        "working directory, then in the project root (where the setup script writes the tiny model)."
    )
    accelerator: Literal["cpu", "gpu"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="float32 on CPU: bf16 selected an AMX kernel that crashed on the dev machine."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=8)
    max_model_len: int = Field(ge=16, description="Context length (prompt + response) of one request.")
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    fold_system_prompt: bool = Field(
        default=True, description="Fold system messages into the first user turn (DeepCoder uses no system prompt)."
    )
    admin_token_env: str = Field(
        default="CODER_ADMIN_TOKEN",
        description="Environment variable holding the bearer token of the admin routes; unset disables them.",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the engine replicas.")
    server: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options of the vLLM replicas (num_replicas, autoscaling...)."
    )
    ingress: dict[str, Any] = Field(default_factory=dict, description="Serve deployment options of the OpenAI ingress.")
    placement_group: dict[str, Any] | None = Field(
        default=None,
        description="Resource bundles of the engine workers (ray.serve.llm `placement_group_config`); by default "
        "one {CPU: 1} or {GPU: 1} bundle per tensor-parallel rank.",
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_shadowed_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "dtype", "max_model_len", "tensor_parallel_size", "override_generation_config",
                 "worker_extension_cls"}
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(f"engine_kwargs must not set {clash}: use the top-level fields of the coder config")
        return value

    def resolved_model_source(self) -> str:
        """Absolute path of a local checkpoint, or the hub id unchanged."""
        for base in (Path.cwd(), PROJECT_ROOT):
            candidate = (base / self.model_source).resolve()
            if candidate.is_dir():
                return str(candidate)
        if self.model_source.startswith((".", "/")):
            raise ValueError(
                f"model_source {self.model_source!r} is not a directory (looked in {Path.cwd()} and {PROJECT_ROOT}); "
                "for the tiny CPU model run `python -m deployments.coder.tiny_model --out .cache/models/tiny-coder`"
            )
        return self.model_source
