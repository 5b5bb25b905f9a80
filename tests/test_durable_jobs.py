"""Kill -9 the whole `serve run` process group with jobs queued and running; start it again on the same data
directory: every job completes with the bytes an undisturbed run gives, and what finished before still downloads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from attention.spmd import free_port
from serve_graph.serve_configs import LOCAL_CONFIG, PROJECT_ROOT
from tests.conftest import TEST_HEIGHTS
from tests.video_jobs import wait

pytestmark = pytest.mark.serve
SERVE = Path(sys.executable).with_name("serve")


def _config(tmp_path: Path, port: int) -> Path:
    """configs/local.yaml's video app (2 ingress replicas, SQLite store) on a temp data directory, scaled down."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = port
    [video] = [a for a in config["applications"] if a["name"] == "video"]
    config["applications"] = [video]
    args = video["args"]
    args["store"]["data_dir"] = str(tmp_path / "data")
    for model in args["models"]:
        if model["family"] != "sd3":
            model["resolution_heights"] = {k: v for k, v in TEST_HEIGHTS.items() if k in ("240p", "360p")}
    args["scheduler"]["budget"]["max_batch_size"] = 2  # jobs wait in the pool: some are queued at the kill
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local Ray cluster, never an outer one
    process = subprocess.Popen([str(SERVE), "run", str(config)], cwd=PROJECT_ROOT, env=env, start_new_session=True,
                               stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"serve run did not come up: {log.read_text()[-3000:]}")


def _kill_group(process: subprocess.Popen) -> None:
    """kill -9 `serve run` and every process of its session: its Ray cluster (GCS, raylet) and the replicas, which
    Ray puts in process groups of their own. No other Ray instance on the machine is touched."""
    session = process.pid  # start_new_session: the session id is the leader's pid
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        pid, sid = map(int, line.split())
        if sid == session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


JOBS = [dict(model=model, prompt=f"restart {i}", resolution=resolution, num_frames=frames, num_inference_steps=30,
             seed=100 + i) for i, (model, resolution, frames) in enumerate(
    [("cogvideox-tiny", "360p", 9), ("wan-tiny", "360p", 9), ("mochi-tiny", "240p", 7), ("cogvideox-tiny", "240p", 9),
     ("wan-tiny", "240p", 9), ("cogvideox-tiny", "360p", 17)])]


def test_a_killed_app_restarted_on_its_data_directory_completes_every_job(tmp_path):
    port = free_port()
    config, log = _config(tmp_path, port), tmp_path / "serve.log"
    process = _start(config, port, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            before = client.post("/v1/videos", json=dict(model="cogvideox-tiny", prompt="before", seed=1,
                                                         num_inference_steps=2)).json()
            assert wait(client, before["id"], timeout=240, poll_s=0.2)["status"] == "completed"
            before_bytes = client.get(f"/v1/videos/{before['id']}/content").content
            submitted = [client.post("/v1/videos", json=job) for job in JOBS]
            assert all(r.status_code == 202 for r in submitted), [r.text for r in submitted]
            ids = [r.json()["id"] for r in submitted]
            wait(client, ids[0], until=("running",), timeout=240, poll_s=0.2)
            states = [client.get(f"/v1/videos/{i}").json()["status"] for i in ids]
            assert "queued" in states and "completed" not in states, states
        _kill_group(process)
        process = _start(config, port, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            recovered = [wait(client, i, timeout=240, poll_s=0.2) for i in ids]
            assert [j["status"] for j in recovered] == ["completed"] * len(JOBS), recovered
            assert [j["restarts"] for j in recovered] == [1] * len(JOBS), recovered
            assert client.get(f"/v1/videos/{before['id']}/content").content == before_bytes
            crashed = [client.get(f"/v1/videos/{i}/content").content for i in ids]
            undisturbed = [client.post("/v1/videos", json=job).json()["id"] for job in JOBS]
            for job_id, content in zip(undisturbed, crashed):
                assert wait(client, job_id, timeout=240, poll_s=0.2)["restarts"] == 0
                assert client.get(f"/v1/videos/{job_id}/content").content == content
    finally:
        _kill_group(process)
