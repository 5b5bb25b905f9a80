"""Drive traces through the real video app over HTTP, once or more per system, on this machine.

One local Ray + Serve; for each system the video app is deployed with the system's
`scheduler` section on the CPU profile's models and sizes (`cpu_app.real_app_args`:
2 gloo ranks, tiny CogVideoX / Wan, 240p-720p scaled to 32-96 pixels) and a job store
in a temporary directory; each replay of a trace warms it up with one short job, then replays the
trace: each job is POSTed at its arrival offset and polled until done. Latency is what
the client sees: the server's `completed_at` minus the client's submission time (one
machine, one clock).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import ray
from ray import serve

from benchmarks.cpu_app import MODELS, real_app_args
from benchmarks.simulator import System
from benchmarks.workloads import TraceRequest
from common.spmd import free_port
from serve_graph.app import build_video_app

POLL_S = 1.0
"""Seconds between status polls of one job: latency is read from the server's `completed_at`, so polling
faster only adds HTTP work that competes with the ranks for the two cores."""


@dataclass(frozen=True)
class RealOutcome:
    request: TraceRequest
    latency_s: float
    status: str
    job: dict  # the server's last view of the job (timestamps: created_at, started_at, completed_at)


Deployment = dict[str, list[list[RealOutcome]]]
"""One deployment of a system: trace name -> its replays, each a list of outcomes in trace order."""


def run_systems(traces: dict[str, list[TraceRequest]], systems: list[System], replays: int = 1,
                app_args: Callable[[dict], dict] = real_app_args,
                before_delete: Callable[[System], None] | None = None) -> dict[str, Deployment]:
    """Every system deployed once on one local Serve instance (an empty job store each), every trace replayed
    `replays` times in it: system name -> its deployment's runs. `app_args(scheduler)` gives the video app's
    `args` for a system's scheduler section (default: the CPU profile's app); `before_delete(system)` runs after
    a deployment's replays, while it is still up (to read what it measured).

    The traces take turns (the first, the second, ..., then the first again), so that the runs of two traces in
    one deployment share the machine's speed: it drifts up to 2x from one half hour to the next here (the same
    trace on the same system, measured), so a trace run beside another is the only fair yardstick for it. A
    deployment costs ~40 s, a replay of 24 jobs ~30-45 s; back-to-back replays in one deployment differ as much
    as replays in two, so replays are the cheap way to more runs."""
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        out: dict[str, Deployment] = {}
        for system in systems:
            with tempfile.TemporaryDirectory(prefix="real-run-") as data_dir:
                args = app_args(system.scheduler)
                args["store"]["data_dir"] = data_dir  # an empty store per deployment, never the user's .data
                serve.run(build_video_app(args), name="video", route_prefix="/")
                out[system.name] = {name: [] for name in traces}
                for _ in range(replays):
                    for name, trace in traces.items():
                        out[system.name][name].append(asyncio.run(replay(f"http://127.0.0.1:{port}", trace)))
                if before_delete is not None:
                    before_delete(system)
                serve.delete("video")
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def trace_body(request: TraceRequest, steps: int | None = None) -> dict:
    """The POST /v1/videos body of a trace request of the CPU profile's models (`steps`: override its steps)."""
    return {"model": MODELS[request.model], "prompt": request.prompt, "resolution": request.resolution,
            "num_frames": request.num_frames, "num_inference_steps": steps or request.steps, "seed": request.seed}


async def replay(base_url: str, trace: list[TraceRequest],
                 body: Callable[..., dict] = trace_body) -> list[RealOutcome]:
    """One warm-up job, then every request POSTed at its arrival offset (`body(request)`: its JSON; `body(request,
    steps=2)`: the warm-up's) and polled until done."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        warm = (await client.post("/v1/videos", json=body(trace[0], steps=2))).json()
        await _wait(client, warm["id"])
        start = time.time()

        async def one(request: TraceRequest) -> RealOutcome:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.time()))
            submitted = time.time()
            response = await client.post("/v1/videos", json=body(request))
            if response.status_code != 202:
                return RealOutcome(request, float("nan"), f"HTTP {response.status_code}: {response.text[:200]}", {})
            job = await _wait(client, response.json()["id"])
            return RealOutcome(request, job["completed_at"] - submitted if job["status"] == "completed" else float("nan"),
                               job["status"], job)

        return list(await asyncio.gather(*(one(r) for r in trace)))


async def _wait(client: httpx.AsyncClient, job_id: str, timeout_s: float = 1800) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = (await client.get(f"/v1/videos/{job_id}")).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"job {job_id} not done after {timeout_s} s")
