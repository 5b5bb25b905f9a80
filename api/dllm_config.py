"""Typed, validated configuration of the diffusion-LM application (`serve_graph.dllm_app:build_dllm_app`).

Each served model names a Dream-layout checkpoint directory and the decoding defaults
its model card recommends (Dream-Coder: temperature 0.1, top_p 1.0, entropy, padding
penalty 3.0; DiffuCoder: temperature 0.4, top_p 0.95, entropy). A client overrides
any of them per request (`steps`, `alg`, ... as extra body fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from api.config import DeploymentResources
from api.serve_configs import PROJECT_ROOT
from common.frozen import FrozenModel
from engine.config import SchedulerConfig
from models.dllm.decoding import ALGORITHMS


class DecodingDefaults(FrozenModel):
    """What a request that leaves a decoding field unset gets (see models.dllm.decoding for each rule)."""

    max_tokens: int = Field(default=256, ge=1, description="Response length (masked positions) when unset.")
    tokens_per_step: int = Field(
        default=1, ge=1, description="Default `steps` = ceil(max_tokens / tokens_per_step): 1 is Dream's "
        "one token per step; 2 halves the steps (and the time) at some cost in quality.")
    alg: Literal[ALGORITHMS] = "entropy"
    alg_temp: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=0.2, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    eos_penalty: float = Field(default=0.0, ge=0, description="Dream-Coder's decaying padding penalty.")
    confidence_threshold: float | None = Field(
        default=None, gt=0, le=1, description="Fast-dLLM parallel unmasking: also unmask every position this sure.")
    block_length: int | None = Field(
        default=None, ge=1, description="Block-wise (semi-autoregressive) decoding in blocks of this many tokens; "
        "a request's max_tokens must be a multiple of it. None: the whole response is one block (Dream).")
    prefix_cache: bool = Field(
        default=False, description="With block_length: reuse the keys/values before the current block (Fast-dLLM).")


class DllmModelConfig(FrozenModel):
    name: str = Field(min_length=1, description="The `model` clients pass; GET /v1/models lists it.")
    source: str = Field(description="Dream-layout checkpoint directory (config.json model_type Dream, safetensors, "
                        "tokenizer). A relative path is looked up in the working directory, then the project root.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_backend: Literal["auto", "sdpa", "flash_attn"] = Field(
        default="auto", description="'auto': flash-attn varlen on CUDA when installed, else SDPA per sequence.")
    decoding: DecodingDefaults = DecodingDefaults()

    def resolved_source(self) -> Path:
        for base in (Path.cwd(), PROJECT_ROOT):
            candidate = (base / self.source).resolve()
            if (candidate / "config.json").is_file():
                return candidate
        raise ValueError(f"model {self.name!r}: source {self.source!r} is not a checkpoint directory (looked in "
                         f"{Path.cwd()} and {PROJECT_ROOT}); for the tiny CPU model run "
                         "`python -m models.dllm.tiny --out .cache/models/tiny-dllm`")


class DllmAppConfig(FrozenModel):
    """The `args:` of the diffusion-LM application: models, one step scheduler replica per device."""

    models: list[DllmModelConfig] = Field(min_length=1)
    scheduler: SchedulerConfig = SchedulerConfig(max_pool_size=64)
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Refuse longer prompts (400); by default only the model's context limits them.")
    ingress: DeploymentResources = DeploymentResources(num_cpus=0.05)
    step_scheduler: DeploymentResources = DeploymentResources(num_cpus=0.15)

    @model_validator(mode="after")
    def _unique_names(self) -> "DllmAppConfig":
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        if self.scheduler.admission != "step":
            raise ValueError("the diffusion-LM scheduler supports admission 'step' only (one device, no rings); "
                             "set budget.max_batch_size 1 for one request at a time")
        return self
