"""FSDP2 training (gloo on CPU): 2 workers take the GRPO+ step 1 worker takes, and a sharded checkpoint resumes on
another worker count with the same optimiser state."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from common.spmd import run_spmd
from deployments.coder.tiny_model import write_tiny_coder
from training.config import TrainConfig
from training.fsdp import full_weights, load_sharded, save_sharded, shard_policy
from training.learner import grpo_update
from training.policy import Policy
from training.rollout import Sample

GROUP = 4


def _config(model: Path) -> TrainConfig:
    return TrainConfig.model_validate(dict(
        model={"path": str(model)}, data={"train": "toy"}, rollout={"group_size": GROUP},
        algorithm={"lr": 1e-3, "mini_batches": 2, "max_grad_norm": 0.5},  # a norm small enough to clip
        context_schedule=[{"from_step": 0, "max_response_tokens": 16}], steps=1))


def _batch(vocab: int) -> tuple[list[Sample], list[float]]:
    """4 groups of 4 responses of different lengths, one truncated, rewards with and without signal."""
    rng = random.Random(0)
    samples = [Sample(problem=i // GROUP, prompt_ids=[rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))],
                      response_ids=[rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))], text="",
                      truncated=i == 5, max_tokens=16) for i in range(4 * GROUP)]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    return samples, rewards


def _worker(rank: int, world: int, job: dict) -> dict:
    torch.manual_seed(0)
    cfg = _config(job["model"])
    policy = Policy(str(job["model"]))
    shard_policy(policy.model)
    # Adam's first steps move every weight by about lr x sign(gradient): a gradient within float noise of zero
    # (two summation orders of the same sum) could flip its weight by 2 x lr. eps 1e-6 keeps such gradients still.
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr, eps=1e-6)
    samples, rewards = _batch(policy.tokenizer.vocab_size)
    out = {}
    if job.get("resume") is not None:
        load_sharded(job["resume"], policy.model, optimizer)
        out["loaded"] = full_weights(policy.model)
    else:
        out["metrics"] = grpo_update(policy, optimizer, samples, rewards, cfg, seed=7)
        out["after_one"] = full_weights(policy.model)
        save_sharded(job["save"], policy.model, optimizer)
    grpo_update(policy, optimizer, samples, rewards, cfg, seed=8)  # the next step: needs Adam's restored moments
    out["after_two"] = full_weights(policy.model)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model = write_tiny_coder(root / "model", seed=0, init_std=0.02)
    one = run_spmd(1, _worker, {"model": model, "save": root / "ckpt-1"}, threads_per_rank=1)
    two = run_spmd(2, _worker, {"model": model, "save": root / "ckpt-2"}, threads_per_rank=1)
    return {"root": root, "model": model, "one": one, "two": two}


def test_two_workers_take_the_step_one_worker_takes(runs):
    one, two = runs["one"][0], runs["two"][0]
    assert runs["two"][1]["after_one"] == {}  # full weights are gathered on rank 0 only
    assert abs(one["metrics"]["loss"] - two["metrics"]["loss"]) < 1e-5, (one["metrics"], two["metrics"])
    assert one["metrics"]["clip_fraction"] == pytest.approx(two["metrics"]["clip_fraction"], abs=1e-6)
    start = Policy(str(runs["model"])).model.state_dict()
    assert _max_diff({k: start[k] for k in one["after_one"]}, one["after_one"]) > 1e-4  # the step moved weights
    assert _max_diff(one["after_one"], two["after_one"]) < 1e-5
    assert _max_diff(one["after_two"], two["after_two"]) < 1e-5


@pytest.mark.parametrize("workers", [1, 3])
def test_a_sharded_checkpoint_resumes_on_another_worker_count(runs, workers):
    """Saved by 2 workers, loaded by 1 or 3: the same weights, and the next step (Adam's moments and step count
    restored) lands where the 2 workers' own next step did."""
    resumed = run_spmd(workers, _worker, {"model": runs["model"], "resume": runs["root"] / "ckpt-2"})[0]
    assert _max_diff(resumed["loaded"], runs["two"][0]["after_one"]) == 0.0
    assert _max_diff(resumed["after_two"], runs["two"][0]["after_two"]) < 1e-5


def _dllm_worker(rank: int, world: int, job: dict) -> dict:
    """One coupled-GRPO step of the diffusion policy (its packed forward under FSDP2, masks drawn per sample)."""
    from training.dllm_policy import DllmPolicy

    torch.manual_seed(0)
    cfg = TrainConfig.model_validate(dict(
        model={"path": str(job["model"]), "family": "dllm"}, data={"train": "toy"},
        rollout={"backend": "served", "app_name": "dllm", "served_model": "tiny-dllm", "group_size": GROUP},
        algorithm={"lr": 1e-3, "mini_batches": 2, "max_grad_norm": 0.5, "substitute_zero_advantage": True},
        context_schedule=[{"from_step": 0, "max_response_tokens": 16}], steps=1))
    policy = DllmPolicy(str(job["model"]), canvas_tokens=16)
    shard_policy(policy.model, policy.FORWARD_METHODS)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr, eps=1e-6)
    samples, rewards = _batch(policy.model.config.vocab_size)
    metrics = grpo_update(policy, optimizer, samples, rewards, cfg, seed=7)
    return {"metrics": metrics, "after": full_weights(policy.model)}


def test_two_workers_take_the_coupled_grpo_step_one_worker_takes(tmp_path):
    from models.dllm.tiny import write_tiny_dllm

    model = write_tiny_dllm(tmp_path / "dllm", seed=0, init_std=0.02)
    one = run_spmd(1, _dllm_worker, {"model": model}, threads_per_rank=1)[0]
    two = run_spmd(2, _dllm_worker, {"model": model}, threads_per_rank=1)[0]
    assert abs(one["metrics"]["loss"] - two["metrics"]["loss"]) < 1e-5, (one["metrics"], two["metrics"])
    assert one["metrics"]["groups_substituted"] == two["metrics"]["groups_substituted"] == 1
    assert _max_diff(one["after"], two["after"]) < 1e-5
