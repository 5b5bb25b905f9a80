"""Validated configuration of a GRPO+ run (`configs/train/*.yaml`).

Every field is documented; the YAML is validated once at start and frozen. The
same file drives the CPU toy run and the DeepCoder-14B recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from common.frozen import FrozenModel
from common.paths import PROJECT_ROOT


class ModelConfig(FrozenModel):
    path: str = Field(description="HF checkpoint directory (relative: to the project root) or hub id of the policy.")
    dtype: Literal["float32", "bfloat16"] = "float32"
    family: Literal["causal", "dllm"] = Field(
        default="causal", description="causal: a HF causal LM (vLLM rollouts, exact log-probs); dllm: a Dream-layout "
                                      "masked-diffusion coder (rollouts from the diffusion-LM app, coupled-GRPO).")

    def resolved(self) -> str:
        candidate = PROJECT_ROOT / self.path
        return str(candidate) if not Path(self.path).is_absolute() and candidate.exists() else self.path


class DataConfig(FrozenModel):
    train: str = Field(description="'toy' (the built-in toy task set) or a curated JSONL of problems.")
    held_out: str | None = Field(default="toy", description="'toy', a JSONL, or null: evaluated at start/end.")
    batch_problems: int = Field(default=8, ge=1, description="Problems per step (DeepCoder: 32-128).")
    seed: int = 0


class RolloutConfig(FrozenModel):
    backend: Literal["local", "served"] = Field(
        default="local", description="'local': a private vLLM engine in a Ray actor; 'served': the coder Serve app "
                                     "(users keep being served from the weights being trained).")
    group_size: int = Field(default=8, ge=1, description="Samples per problem (GRPO group).")
    temperature: float = Field(default=0.6, ge=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    chunk_problems: int = Field(default=2, ge=1, description="local backend: problems per generate call; rewards "
                                                            "of a chunk start while the next chunk samples.")
    max_prompt_tokens: int = Field(default=2048, ge=16, description="Prompt budget: the engine's context is "
                                                                    "this plus the schedule's longest response.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="local backend: extra vLLM arguments.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="local backend: rollout actor environment.")
    weight_sync: Literal["memory", "disk"] = Field(
        default="memory", description="memory: each step's weights go through the Ray object store (trainer and "
                                      "engines on one cluster); disk: an HF checkpoint directory per step.")
    app_name: str | None = Field(default=None, description="served backend, trainer inside the Serve cluster: "
                                                           "the coder app's name (sampled through its handle).")
    base_url: str | None = Field(default=None, description="served backend, trainer outside the cluster: the coder "
                                                           "app's HTTP root (e.g. http://host:8000/coder).")
    served_model: str | None = Field(default=None, description="served backend: the model id the app serves.")
    admin_token_env: str = Field(default="CODER_ADMIN_TOKEN", description="served over HTTP: env var holding the "
                                                                          "admin routes' bearer token.")
    weights_dir: str | None = Field(default=None, description="disk sync: a directory the engines can read, where "
                                                              "each step's weights are written (default: a temp dir).")
    request_timeout_s: float = Field(default=600.0, gt=0, description="served backend: per sampling request.")
    request_fields: dict[str, Any] = Field(default_factory=dict, description="served backend: extra fields of every "
                                           "sampling request, e.g. the diffusion LM's {steps: 32, alg: entropy}.")

    @model_validator(mode="after")
    def _check_served(self) -> RolloutConfig:
        if self.backend == "local":
            return self
        if (self.app_name is None) == (self.base_url is None) or not self.served_model:
            raise ValueError("the served rollout backend needs rollout.served_model and exactly one of "
                             "rollout.app_name (trainer in the cluster) or rollout.base_url (trainer outside)")
        if self.base_url and not (self.weight_sync == "disk" and self.weights_dir):
            raise ValueError("a trainer outside the cluster (rollout.base_url) syncs weights through a shared "
                             "directory: set rollout.weight_sync: disk and rollout.weights_dir")
        if self.app_name and self.weight_sync != "memory":
            raise ValueError("a trainer inside the cluster (rollout.app_name) syncs weights in memory: set "
                             "rollout.weight_sync: memory (or use rollout.base_url with a shared weights_dir)")
        return self


class AlgorithmConfig(FrozenModel):
    lr: float = Field(default=1e-6, gt=0.0)
    eps_low: float = 0.2
    eps_high: float = 0.28
    mini_batches: int = Field(default=1, ge=1, description="Optimizer updates per pass over the batch.")
    epochs: int = Field(default=1, ge=1, description="Passes over each batch (PPO epochs).")
    max_grad_norm: float = 1.0
    substitute_zero_advantage: bool = Field(
        default=False, description="Dream-Coder: replace groups whose rewards are all equal by copies of groups "
                                   "with signal (training.coupled_grpo).")
    estimator: Literal["coupled", "single"] = Field(
        default="coupled", description="dllm family: per-token log-likelihoods from complementary mask pairs "
                                       "(coupled-GRPO) or from as many independent masks (the baseline).")
    mask_pairs: int = Field(default=1, ge=1, description="dllm family: mask pairs per sample (2 forwards each).")
    mask_ratio_low: float = Field(default=0.2, gt=0.0, le=0.5, description="dllm family: mask ratios are drawn "
                                                                          "from [low, 1 - low].")


class ContextStage(FrozenModel):
    from_step: int = Field(ge=0)
    max_response_tokens: int = Field(ge=1)


class WarmStartConfig(FrozenModel):
    steps: int = Field(default=0, ge=0, description="Supervised steps on reference solutions before RL (0: none).")
    batch: int = 16
    lr: float = 1e-3
    label_noise: float = Field(default=0.0, ge=0.0, le=1.0, description="Toy data only: share of demonstrations "
                                                                         "with a wrong operation (imperfect teacher).")


class RewardSettings(FrozenModel):
    timeout_s: float = Field(default=6.0, ge=6.0, le=12.0)
    tests_per_problem: int = 15
    workers: int = Field(default=2, ge=1, description="Reward actors (each runs one sandboxed test at a time).")


class TrainConfig(FrozenModel):
    name: str = "grpo"
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    context_schedule: tuple[ContextStage, ...] = Field(
        description="Maximum response length by step, applied without restarting (DeepCoder: 16K then 32K).")
    warm_start: WarmStartConfig = WarmStartConfig()
    reward: RewardSettings = RewardSettings()
    pipeline: Literal["one_off", "sync"] = Field(
        default="one_off", description="one_off: batch k+1 samples while batch k trains (staleness <= 1).")
    steps: int = Field(ge=1)
    checkpoint_every: int = Field(default=10, ge=1)
    storage_path: str = Field(default="runs", description="Ray Train storage for checkpoints (relative: project root).")
    trainer_workers: int = Field(default=1, ge=1, description="Ray Train workers; the policy is sharded over them "
                                                             "(FSDP2) and each trains on its part of a batch.")
    trainer_use_gpu: bool = Field(default=False, description="One GPU per worker (NCCL); else CPU workers (gloo).")
    trainer_cpus: float = 1.0
    trainer_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per "
                                                "worker, e.g. {train-gpu: 0.125}: the k8s node group it must use.")
    rollout_cpus: float = 0.5

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        starts = [s.from_step for s in self.context_schedule]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError("context_schedule must start at step 0 with increasing from_step values")
        if self.model.family == "dllm" and self.rollout.app_name is None:
            raise ValueError("a diffusion-LM policy (model.family: dllm) samples from the diffusion-LM Serve app: "
                             "set rollout.backend: served, rollout.app_name and rollout.served_model")
        return self

    def max_response_tokens(self, step: int) -> int:
        return [s.max_response_tokens for s in self.context_schedule if s.from_step <= step][-1]

    def storage(self) -> str:
        return str(Path(self.storage_path) if Path(self.storage_path).is_absolute()
                   else PROJECT_ROOT / self.storage_path)

    def metrics_path(self) -> Path:
        """Per-step metrics of the run, one JSON object a line."""
        return Path(self.storage()) / self.name / "metrics.jsonl"


def load_config(path: Path, **overrides: Any) -> TrainConfig:
    data = yaml.safe_load(Path(path).read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(data)
