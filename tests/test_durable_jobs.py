"""The durability suite, against SQLite and against a real PostgreSQL: `serve run` of configs/local.yaml's video app
(two ingress replicas, one job runner) with its job store on each backend. Kill -9 one ingress replica, the
scheduler replica, then the whole `serve run` process group with jobs queued and running, and start it again on the
same stores: every job completes (the re-admitted ones, an image-to-video job among them, with the bytes an
undisturbed run gives), what finished
before still downloads, and an Idempotency-Key sent to both replicas at once makes one job."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from api.serve_configs import LOCAL_CONFIG
from common.paths import PROJECT_ROOT
from common.spmd import free_port
from deployments.media import probe_mp4
from tests.conftest import TEST_HEIGHTS
from tests.postgres_server import postgres_server
from tests.video_jobs import data_url, png_bytes, submit, wait

pytestmark = pytest.mark.serve
SERVE = Path(sys.executable).with_name("serve")


def _config(tmp_path: Path, port: int, jobs_url: str | None) -> Path:
    """configs/local.yaml's video app on a temp data directory (and `jobs_url` when given), scaled down."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = port
    [video] = [a for a in config["applications"] if a["name"] == "video"]
    config["applications"] = [video]
    args = video["args"]
    args["store"]["data_dir"] = str(tmp_path / "data")
    if jobs_url is not None:
        args["store"]["jobs_url"] = jobs_url
    for model in args["models"]:
        if model["family"] != "sd3":
            model["resolution_heights"] = {k: v for k, v in TEST_HEIGHTS.items() if k in ("240p", "360p", "480p")}
    args["scheduler"]["budget"]["max_batch_size"] = 2  # jobs wait in the pool: some are queued at the kill
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _session_processes(session: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in `serve run`'s session; Ray titles replicas
    `ray::ServeReplica:<app>:<deployment>`."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in listing.splitlines()]
    return [(int(pid), args) for pid, sid, *rest in rows if int(sid) == session for args in (rest or [""])]


@dataclass
class ServeRun:
    """One `serve run` of the config, restartable on the same stores."""

    config: Path
    port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local Ray cluster, never an outer one
        self.process = subprocess.Popen([str(SERVE), "run", str(self.config)], cwd=PROJECT_ROOT, env=env,
                                        start_new_session=True, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise AssertionError(f"serve run did not come up: {self.log.read_text()[-3000:]}")

    def replica_pids(self, deployment: str) -> list[int]:
        return [pid for pid, args in _session_processes(self.process.pid)
                if args.startswith(f"ray::ServeReplica:video:{deployment}")]

    def kill(self) -> None:
        """kill -9 `serve run` and every process of its session: its Ray cluster (GCS, raylet) and the replicas,
        which Ray puts in process groups of their own. No other Ray instance on the machine is touched."""
        for pid, _ in _session_processes(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)


# PostgreSQL: the job store's own tests run on a real server in the default run; the whole app on it is `-m slow`.
@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def app(request, tmp_path_factory) -> Iterator[ServeRun]:
    with contextlib.ExitStack() as stack:
        jobs_url = stack.enter_context(postgres_server()) if request.param == "postgresql" else None
        tmp_path, port = tmp_path_factory.mktemp(f"durable-{request.param}"), free_port()
        run = ServeRun(_config(tmp_path, port, jobs_url), port, tmp_path / "serve.log")
        run.start()
        stack.callback(run.kill)
        yield run


def test_an_idempotency_key_sent_to_both_replicas_at_once_makes_one_job(app):
    ask = dict(model="wan-tiny", prompt="exactly once", num_inference_steps=2, seed=5)
    with app.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/videos", json=ask, headers={"Idempotency-Key": "k-1"}),
                                range(8)))
        assert [r.status_code for r in answers] == [202] * 8, [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        assert wait(client, answers[0].json()["id"], timeout=120, poll_s=0.2)["status"] == "completed"
        listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
        assert [j["id"] for j in listed].count(answers[0].json()["id"]) == 1 and len(listed) == 1


def test_a_killed_ingress_replica_loses_no_job(app):
    """kill -9 one of the two ingress replicas while jobs run: the other answers, Serve replaces the dead one, and
    every job completes."""
    ingresses = app.replica_pids("VideoIngress")
    assert len(ingresses) == 2, ingresses
    with app.client() as client:
        ids = [submit(client, model="cogvideox-tiny", prompt=f"ingress {i}", num_inference_steps=40, seed=i)["id"]
               for i in range(4)]
        os.kill(ingresses[0], signal.SIGKILL)
        failed_polls, pending, deadline = 0, set(ids), time.time() + 180
        while pending:
            assert time.time() < deadline, pending
            for job_id in list(pending):
                try:
                    r = client.get(f"/v1/videos/{job_id}")
                except httpx.HTTPError:
                    r = None
                if r is None or r.status_code != 200:  # a request caught on the dying replica
                    failed_polls += 1
                    continue
                assert r.json()["status"] not in ("failed", "cancelled"), r.json()
                if r.json()["status"] == "completed":
                    pending.discard(job_id)
            time.sleep(0.2)
        assert failed_polls <= 2, failed_polls
        assert all(probe_mp4(client.get(f"/v1/videos/{i}/content").content)[0] == 9 for i in ids)
    deadline = time.time() + 120
    while len(replaced := app.replica_pids("VideoIngress")) < 2:  # Serve starts a new replica in its place
        assert time.time() < deadline, replaced
        time.sleep(1)
    assert ingresses[0] not in replaced


def test_a_killed_scheduler_replica_costs_time_not_jobs(app):
    """kill -9 the scheduler replica while it holds two jobs; Serve replaces it (and its worker group) and the job
    runner re-admits both from their stored specs: they complete, each counting one restart."""
    [scheduler] = app.replica_pids("StepScheduler")
    with app.client() as client:
        # Long enough (~7 s here; 40 steps of 9 frames took 0.76 s) that the kill lands while both are unfinished.
        ids = [submit(client, model="cogvideox-tiny", prompt=f"survivor {i}", resolution="480p", num_frames=17,
                      num_inference_steps=200, seed=i)["id"] for i in range(2)]
        # Both in the pool: the first has run steps long after the second (sent with it) reached the scheduler. The
        # second need not have run a step: the cost rule may keep two equal jobs in series (SRPT's order).
        _wait_for_step(client, ids[0], 10)
        assert [client.get(f"/v1/videos/{i}").json()["status"] for i in ids] in (["running", "queued"],
                                                                                ["running", "running"])
        os.kill(scheduler, signal.SIGKILL)
        for job_id in ids:
            done = wait(client, job_id, timeout=300, poll_s=0.2)
            assert done["status"] == "completed" and done["restarts"] == 1, done
            assert probe_mp4(client.get(f"/v1/videos/{job_id}/content").content)[0] == 17


def _wait_for_step(client: httpx.Client, job_id: str, step: int, timeout: float = 120) -> None:
    """Until the job has run `step` denoising steps."""
    deadline = time.time() + timeout
    while (job := client.get(f"/v1/videos/{job_id}").json())["progress"]["step"] < step:
        assert time.time() < deadline and job["status"] in ("queued", "running"), job
        time.sleep(0.05)


JOBS = [dict(model=model, prompt=f"restart {i}", resolution=resolution, num_frames=frames, num_inference_steps=30,
             seed=100 + i) for i, (model, resolution, frames) in enumerate(
    [("cogvideox-tiny", "360p", 9), ("wan-tiny", "360p", 9), ("mochi-tiny", "240p", 7), ("cogvideox-tiny", "240p", 9),
     ("wan-tiny", "240p", 9), ("cogvideox-tiny", "360p", 17)])] + [
    dict(model="cogvideox-i2v-tiny", prompt="restart from a picture", resolution="240p", num_frames=9,
         num_inference_steps=30, seed=200, input_reference=data_url(png_bytes(0)))]  # its stored image is replayed


def test_a_killed_app_restarted_on_its_stores_completes_every_job(app):
    """Runs last in the module: kill -9 the whole process group, start again."""
    with app.client() as client:
        before = submit(client, model="cogvideox-tiny", prompt="before", seed=1, num_inference_steps=2)["id"]
        assert wait(client, before, timeout=240, poll_s=0.2)["status"] == "completed"
        before_bytes = client.get(f"/v1/videos/{before}/content").content
        ids = [submit(client, **job)["id"] for job in JOBS]
        wait(client, ids[0], until=("running",), timeout=240, poll_s=0.2)
        states = [client.get(f"/v1/videos/{i}").json()["status"] for i in ids]
        assert "queued" in states and "completed" not in states, states
    app.kill()
    app.start()
    with app.client() as client:
        recovered = [wait(client, i, timeout=240, poll_s=0.2) for i in ids]
        assert [j["status"] for j in recovered] == ["completed"] * len(JOBS), [j["error"] for j in recovered]
        assert [j["restarts"] for j in recovered] == [1] * len(JOBS), recovered
        assert client.get(f"/v1/videos/{before}/content").content == before_bytes
        crashed = [client.get(f"/v1/videos/{i}/content").content for i in ids]
        undisturbed = [submit(client, **job)["id"] for job in JOBS]
        for job_id, content in zip(undisturbed, crashed):
            assert wait(client, job_id, timeout=240, poll_s=0.2)["restarts"] == 0
            assert client.get(f"/v1/videos/{job_id}/content").content == content


def test_a_failed_job_reports_the_replica_exception_without_rays_traceback():
    from ray.exceptions import RayTaskError

    from deployments.job_runner import failure_reason
    from deployments.vae_decoder import InputImageMissing

    message = "the job's input image is missing from the blob store"
    try:
        raise InputImageMissing(message)
    except InputImageMissing as exc:
        remote = RayTaskError("encode_image", "Traceback (most recent call last): ...", exc).as_instanceof_cause()
    assert str(remote) != message and failure_reason(remote) == message  # Ray prefixes the remote process
    assert failure_reason(ValueError("num_frames: 4")) == "num_frames: 4"
