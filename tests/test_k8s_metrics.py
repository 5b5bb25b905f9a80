"""Every metric a Grafana panel queries is exported by a live local run (video, coder, trainer gauges)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from api.serve_configs import serve_application
from deployments.coder.tiny_model import write_tiny_coder
from deployments.media import probe_mp4
from k8s.dashboards import DASHBOARDS, dump
from serve_graph.app import build_video_app
from serve_graph.coder_app import build_coder_app

pytestmark = pytest.mark.serve
ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\bray_[a-z0-9_]+")



def dashboard_metrics() -> set[str]:
    names = set()
    for build in DASHBOARDS.values():
        for panel in build()["panels"]:
            for target in panel["targets"]:
                names |= set(METRIC.findall(target["expr"]))
    return names


@ray.remote(num_cpus=0)
class _TrainingSteps:
    """Records a GRPO+ step's gauges every 2 s until killed (Ray drops gauges that stop being set)."""

    async def run(self) -> None:
        import asyncio

        from training.metrics import PHASES, STEP_FIELDS, TrainingMetrics

        metrics = TrainingMetrics("test-run")
        while True:
            metrics.record({**{k: 0.5 for k in STEP_FIELDS}, **{k: 1.0 for k in PHASES}, "step": 3})
            await asyncio.sleep(2)


def _wait_status(client: httpx.Client, video_id: str, status: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while (job := client.get(f"/v1/videos/{video_id}").json())["status"] != status:
        assert time.time() < deadline and job["status"] not in ("failed", "cancelled"), job
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scraped(serve_cluster, tmp_path_factory) -> str:
    metrics_port = serve_cluster.metrics_port
    checkpoint = write_tiny_coder(tmp_path_factory.mktemp("coder") / "m")
    coder_args = {**serve_application("coder")["args"], "model_source": str(checkpoint),
                  "max_model_len": 512}
    video_args = serve_application("video")["args"]
    video_args["store"]["data_dir"] = str(tmp_path_factory.mktemp("video-data"))
    video_args["scheduler"]["planner"]["min_shard_tokens"] = 1024  # a 360p row shards (the CPU default shards none)
    serve.run(build_video_app(video_args), name="video", route_prefix="/")
    serve.run(build_coder_app(coder_args), name="coder", route_prefix="/coder")
    scheduler = serve.get_deployment_handle("StepScheduler", app_name="video")
    with httpx.Client(base_url=serve_cluster.url, timeout=60) as client:
        # Steps 0 and 2 compute, step 1 comes from the TaylorSeer cache (the step-cache panel's metrics).
        job = client.post("/v1/videos", json={"model": "wan-tiny", "prompt": "a cat", "resolution": "240p",
                                              "num_frames": 5, "num_inference_steps": 3,
                                              "cache": {"mode": "taylorseer", "warmup_steps": 1, "interval": 2}}).json()
        # 2,640 tokens per row: sharded over both ranks (KV traffic); one rank is killed while it runs.
        sharded = client.post("/v1/videos", json={"model": "wan-tiny", "prompt": "waves", "resolution": "360p",
                                                  "num_frames": 9, "num_inference_steps": 6}).json()
        _wait_status(client, sharded["id"], "running")
        os.kill(scheduler.stats.remote().result()["pids"][1], signal.SIGKILL)
        for video in (job, sharded):
            _wait_status(client, video["id"], "completed")
        mp4 = client.get(f"/v1/videos/{job['id']}/content").content
        with client.stream("POST", "/coder/v1/completions", json={"model": "tiny-coder", "prompt": "def f():",
                                                                   "max_tokens": 16, "stream": True}) as r:
            assert r.status_code == 200 and "data:" in r.read().decode()
    training = _TrainingSteps.remote()
    training.run.remote()
    wanted, text = dashboard_metrics(), ""
    deadline = time.time() + 90
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        if any(name.startswith("ray_vllm_") for name in missing):  # vLLM sets its gauges only while serving
            httpx.post(f"{serve_cluster.url}/coder/v1/completions", timeout=60,
                       json={"model": "tiny-coder", "prompt": "def g():", "max_tokens": 8})
        time.sleep(2)
    ray.kill(training)
    yield text, mp4


def test_every_dashboard_metric_is_exported(scraped):
    text, _ = scraped
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    wanted = dashboard_metrics()
    assert {"ray_dit_step_duration_seconds_bucket", "ray_vllm_time_to_first_token_seconds_bucket",
            "ray_grpo_mean_reward"} <= wanted
    assert sorted(wanted - exported) == []


def test_killed_rank_counted_as_one_group_restart(scraped):
    text, _ = scraped
    restarts = [float(v) for v in re.findall(r"^ray_dit_group_restarts_total(?:{[^}]*})? (\S+)$", text, re.M)]
    assert sum(restarts) == 1
    ring_sizes = re.findall(r'^ray_dit_ring_size_bucket{[^}]*le="1\.0"[^}]*} (\S+)$', text, re.M)
    rows = re.findall(r"^ray_dit_ring_size_count(?:{[^}]*})? (\S+)$", text, re.M)
    assert 0 < sum(map(float, ring_sizes)) < sum(map(float, rows))  # rows on 1-rank and on 2-rank rings


def test_cpu_default_renders_240p_at_240_pixels(scraped):
    """configs/local.yaml as served: a 240p 16:9 request is a 240-pixel-high video."""
    _, mp4 = scraped
    assert probe_mp4(mp4) == (5, 240, 432)


def test_committed_dashboards_equal_their_rendering():
    for name, build in DASHBOARDS.items():
        assert (ROOT / "k8s" / "grafana" / name).read_text() == dump(build()), f"k8s/grafana/{name} is stale: run python -m k8s.dashboards"


def test_scrape_configs_point_at_the_metrics_port():
    monitor = yaml.safe_load((ROOT / "k8s/prometheus/podmonitor.yaml").read_text())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    service = yaml.safe_load((ROOT / "k8s/rayservice.yaml").read_text())
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert {"containerPort": 8080, "name": "metrics"} in head["template"]["spec"]["containers"][0]["ports"]
    local = yaml.safe_load((ROOT / "k8s/prometheus/prometheus-local.yaml").read_text())
    assert local["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
