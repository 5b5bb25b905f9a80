"""Every Serve config in configs/ is a valid ServeDeploySchema whose video, coder and dLLM app args validate, and
whose apps agree with what reads them (the training recipes that sample the coder app)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from api.coder_config import CoderAppConfig
from api.config import VideoAppConfig
from api.dllm_config import DllmAppConfig
from common.paths import PROJECT_ROOT
from serve_graph.coder_app import make_llm_config
from training.config import load_config

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
TRAIN_CONFIGS = sorted((PROJECT_ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_a_valid_serve_config(path):
    schema = ServeDeploySchema(**yaml.safe_load(path.read_text()))
    videos = [a for a in schema.applications if a.import_path == "serve_graph.app:build_video_app"]
    assert videos, f"{path.name} serves no video app"
    for app in videos:
        assert VideoAppConfig(**app.args).ingress_replicas >= 2  # any replica answers any job
    coders = [a for a in schema.applications if a.import_path == "serve_graph.coder_app:build_coder_app"]
    assert coders, f"{path.name} serves no coder app"
    for app in coders:
        config = CoderAppConfig(**app.args)
        if config.accelerator == "gpu":  # the hub id passes through; a local tiny path needs setup first
            make_llm_config(config)
        # A recipe that trains through this app samples as the app's users are served.
        for recipe in (load_config(p) for p in TRAIN_CONFIGS):
            if recipe.rollout.backend == "served" and recipe.rollout.served_model == config.model_id:
                sampling = config.sampling_defaults
                assert (recipe.rollout.temperature, recipe.rollout.top_p) == (sampling.temperature, sampling.top_p)
    [dllm] = [a for a in schema.applications if a.import_path == "serve_graph.dllm_app:build_dllm_app"]
    DllmAppConfig(**dllm.args)


def test_bad_args_name_the_field():
    with pytest.raises(ValidationError, match="max_batch_size"):
        VideoAppConfig(models=[{"name": "m", "family": "cogvideox"}], scheduler={"budget": {"max_batch_size": 0}})
    with pytest.raises(ValidationError, match="unique"):
        VideoAppConfig(models=[{"name": "m", "family": "wan"}, {"name": "m", "family": "wan"}])


def test_bad_dllm_args_name_the_field(tmp_path):
    with pytest.raises(ValidationError, match="alg"):
        DllmAppConfig(models=[{"name": "m", "source": "x", "decoding": {"alg": "greedy"}}])
    with pytest.raises(ValidationError, match="admission"):
        DllmAppConfig(models=[{"name": "m", "source": "x"}], scheduler={"admission": "batch", "batch_size": 1})
    missing = DllmAppConfig(models=[{"name": "m", "source": str(tmp_path)}]).models[0]
    with pytest.raises(ValueError, match="models.dllm.tiny"):
        missing.resolved_source()  # no config.json: the error says how to write the tiny checkpoint


def test_store_urls_default_under_the_data_dir_and_expand_variables(tmp_path, monkeypatch):
    from api.config import StoreConfig

    store = StoreConfig(data_dir=str(tmp_path))
    assert store.resolved_jobs_url() == f"sqlite:///{tmp_path / 'jobs.db'}"
    assert store.resolved_blobs_url() == str(tmp_path / "blobs")
    monkeypatch.setenv("DIT_JOBS_URL", "postgresql://dit@db:5432/dit")
    assert StoreConfig(jobs_url="${DIT_JOBS_URL}").resolved_jobs_url() == "postgresql://dit@db:5432/dit"
