"""coupled-GRPO end to end on CPU (configs/train/tiny-dllm-served.yaml): the tiny diffusion coder warm-started, then
trained on the toy tasks with every rollout decoded by the diffusion-LM Serve app and each step's weights synced
into its scheduler replica in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray import serve

from api.serve_configs import serve_application
from models.dllm.checkpoint import checkpoint_tensors
from models.dllm.tiny import write_tiny_dllm
from serve_graph.dllm_app import build_dllm_app
from training.config import load_config
from training.train import run

# Ray, Serve, the diffusion-LM app and Ray Train, a warm start and a dozen steps: beyond the default 600 s.
pytestmark = [pytest.mark.serve, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(serve_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coupled-grpo")
    policy = write_tiny_dllm(tmp / "policy", seed=0, init_std=0.02)
    app = serve_application("dllm")
    args = app["args"]
    args["models"][0]["source"] = str(policy)
    serve.run(build_dllm_app(args), name="dllm", route_prefix=app["route_prefix"])
    cfg = load_config(ROOT / "configs/train/tiny-dllm-served.yaml",
                      model={"path": str(policy), "dtype": "float32", "family": "dllm"},
                      storage_path=str(tmp / "runs"))
    result = run(cfg)
    served = serve.get_app_handle("dllm").replica_weights.remote(cfg.rollout.served_model).result()
    yield {"cfg": cfg, "result": result, "served": served, "policy": policy}


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.metrics_path().read_text().splitlines()]


def test_coupled_grpo_raises_held_out_reward_above_the_warm_start(trained):
    rows = _metrics(trained["cfg"])
    start, end = rows[0]["held_out_reward"], rows[-1]["held_out_reward"]
    print(f"held-out reward: warm start {start:.3f} -> {end:.3f} after {trained['cfg'].steps} coupled-GRPO steps")
    assert end > start, (start, end)
    steps = rows[1:]
    assert steps[0]["staleness"] == 0 and all(r["staleness"] <= 1 for r in steps)
    assert all(r["weight_sync_s"] > 0 for r in steps[1:]) and any(r["groups_substituted"] > 0 for r in steps)


def test_the_served_replica_serves_the_trained_weights(trained):
    cfg, [replica] = trained["cfg"], trained["served"]
    assert replica["source"] == "memory" and replica["trainer_version"] == cfg.steps
    exported = checkpoint_tensors(Path(trained["result"].checkpoint.path) / "model")
    start = checkpoint_tensors(trained["policy"])
    assert exported.keys() == start.keys()
    assert any(not (exported[k] == start[k]).all() for k in start)  # trained, in Dream's layout
