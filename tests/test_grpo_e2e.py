"""CPU end-to-end GRPO+ run (configs/train/tiny-cpu.yaml): warm start, pipelined RL, checkpoint, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployments.coder.tiny_model import write_tiny_coder
from training.config import load_config
from training.policy import Policy
from training.train import run

pytestmark = pytest.mark.serve  # starts Ray and a vLLM engine: slow
ROOT = Path(__file__).resolve().parents[1]


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.metrics_path().read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(serve_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    policy = write_tiny_coder(tmp / "policy", seed=0, init_std=0.02)
    # 10 steps: the pipeline, the schedule's switch at step 6 and a checkpoint. That GRPO+ raises the held-out
    # reward is asserted on the full served run (tests/test_grpo_served.py), which trains through the same learner.
    cfg = load_config(ROOT / "configs/train/tiny-cpu.yaml", model={"path": str(policy), "dtype": "float32"},
                      storage_path=str(tmp / "runs"), steps=10)
    yield cfg, run(cfg)


def test_held_out_reward_is_logged_at_the_start_and_the_end(trained):
    cfg, _ = trained
    rows = _metrics(cfg)
    assert rows[0]["step"] == -1 and rows[-1]["step"] == cfg.steps - 1
    assert all(0.0 <= rows[i]["held_out_reward"] <= 1.0 for i in (0, -1))


def test_pipelining_staleness_schedule_and_logged_fields(trained):
    cfg, _ = trained
    steps = _metrics(cfg)[1:]
    assert steps[0]["staleness"] == 0 and all(r["staleness"] == 1 for r in steps[1:])  # one-off: bounded by 1
    assert [r["max_response_tokens"] for r in steps] == [cfg.max_response_tokens(r["step"]) for r in steps]
    assert {r["max_response_tokens"] for r in steps} == {26, 32}  # lengthened without a restart
    assert any(r["truncated"] > 0 for r in steps if r["max_response_tokens"] == 26)  # overlong-filtered
    for field in ("mean_reward", "groups_with_signal", "response_tokens", "clip_fraction", "entropy",
                  "generate_s", "wait_rollout_s", "train_s", "step_s"):
        assert all(isinstance(r[field], float) for r in steps), field


def test_checkpoint_reloads_and_the_run_resumes(trained, tmp_path):
    cfg, result = trained
    ckpt = Path(result.checkpoint.path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == cfg.steps and state["version"] == cfg.steps
    assert state["max_response_tokens"] == 32 and {"epoch", "index"} <= state.keys()
    policy = Policy(str(ckpt / "model"))
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp"]  # one shard

    resumed_cfg = load_config(ROOT / "configs/train/tiny-cpu.yaml", model={"path": str(ckpt / "model")},
                              storage_path=cfg.storage_path, name=f"{cfg.name}-resumed", steps=cfg.steps + 2)
    resumed = run(resumed_cfg, resume=str(ckpt))
    rows = _metrics(resumed_cfg)
    assert [r["step"] for r in rows] == [cfg.steps, cfg.steps + 1]  # no warm start, no step repeated
    assert json.loads((Path(resumed.checkpoint.path) / "trainer_state.json").read_text())["step"] == cfg.steps + 2
    assert policy.model.config.model_type == "qwen2"


def test_two_fsdp_workers_train_sync_and_checkpoint_their_shards(trained):
    """The same loop on 2 Ray Train workers (gloo): rank 0 drives the rollouts, both train their parts, the
    gathered weights reach the engine each step, and the checkpoint holds one shard per worker."""
    cfg, result = trained
    two = load_config(ROOT / "configs/train/tiny-cpu.yaml", model={"path": str(Path(result.checkpoint.path) / "model")},
                      storage_path=cfg.storage_path, name=f"{cfg.name}-fsdp2", steps=2, trainer_workers=2,
                      trainer_cpus=0.5, warm_start={"steps": 0}, data={"train": "toy", "held_out": None})
    fsdp = run(two)
    rows = _metrics(two)
    assert [r["step"] for r in rows] == [0, 1] and [r["staleness"] for r in rows] == [0, 1]
    assert all(r["weight_sync_s"] is None or r["weight_sync_s"] >= 0 for r in rows)
    ckpt = Path(fsdp.checkpoint.path)
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["version"] == 2
    assert Policy(str(ckpt / "model")).model.config.model_type == "qwen2"
