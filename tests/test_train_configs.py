"""Every training config validates; the schedule and the recipe hold what the docs say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from training.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_training_config_validates(path):
    cfg = load_config(path)
    assert cfg.rollout.group_size >= 2  # a group-relative advantage needs siblings
    assert cfg.algorithm.eps_high > cfg.algorithm.eps_low  # GRPO+'s clip-high


ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["deepcoder-14b.yaml", "deepcoder-14b-served.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_deepcoder_recipe_lengthens_context_16k_to_32k(name):
    cfg = load_config(ROOT / "configs/train" / name)
    assert [cfg.max_response_tokens(s) for s in (0, 179, 180, 249)] == [16384, 16384, 32768, 32768]


def test_served_recipe_trains_the_coder_app_of_the_gpu_config():
    """Rollouts through configs/gpu.yaml's coder app: same app name and model id, the served checkpoint as the
    starting policy, a context that holds the longest prompt + response of the schedule."""
    cfg = load_config(ROOT / "configs/train/deepcoder-14b-served.yaml")
    [app] = [a for a in yaml.safe_load((ROOT / "configs/gpu.yaml").read_text())["applications"]
             if a["name"] == cfg.rollout.app_name]
    assert cfg.rollout.backend == "served" and cfg.rollout.weight_sync == "memory"
    assert app["args"]["model_id"] == cfg.rollout.served_model and app["args"]["model_source"] == cfg.model.path
    longest = max(s.max_response_tokens for s in cfg.context_schedule)
    assert app["args"]["max_model_len"] >= cfg.rollout.max_prompt_tokens + longest


@pytest.mark.parametrize("name", RECIPES)
def test_deepcoder_trainer_fills_the_train_gpu_node_of_the_rayservice(name):
    """8 FSDP workers, one GPU each, whose custom resource adds up to the one `train-gpu` pod of 8 GPUs."""
    cfg = load_config(ROOT / "configs/train" / name)
    service = yaml.safe_load((ROOT / "k8s/rayservice.yaml").read_text())
    [group] = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "train-gpu"]
    assert cfg.trainer_use_gpu and cfg.trainer_workers == int(group["rayStartParams"]["num-gpus"])
    assert cfg.trainer_workers * cfg.trainer_resources["train-gpu"] == 1.0
    mini_batch = cfg.data.batch_problems * cfg.rollout.group_size // cfg.algorithm.mini_batches
    assert mini_batch >= cfg.trainer_workers  # every worker gets samples of every mini-batch


def test_bad_schedules_and_backends_are_refused():
    base = dict(model={"path": "m"}, data={"train": "toy"}, steps=1)
    with pytest.raises(ValidationError, match="start at step 0"):
        TrainConfig(**base, context_schedule=[{"from_step": 3, "max_response_tokens": 8}])
    schedule = [{"from_step": 0, "max_response_tokens": 8}]
    with pytest.raises(ValidationError, match="served rollout backend needs"):
        TrainConfig(**base, context_schedule=schedule, rollout={"backend": "served"})
    with pytest.raises(ValidationError, match="exactly one of"):
        TrainConfig(**base, context_schedule=schedule, rollout={"backend": "served", "served_model": "m",
                                                                "app_name": "coder", "base_url": "http://h/coder"})
    with pytest.raises(ValidationError, match="weight_sync: disk and rollout.weights_dir"):
        TrainConfig(**base, context_schedule=schedule, rollout={"backend": "served", "served_model": "m",
                                                                "base_url": "http://h/coder"})
    with pytest.raises(ValidationError, match="timeout_s"):
        TrainConfig(**base, context_schedule=[{"from_step": 0, "max_response_tokens": 8}], reward={"timeout_s": 2})
