"""Engine throughput through the real video app over HTTP: a saturating mixed-resolution burst.

Starts the video application of configs/local.yaml on a local Ray Serve (the
tiny models at the tests' scaled-down heights, so 240p-720p all fit in a CPU
run), submits `--requests` jobs at once (CogVideoX and Wan, four resolutions,
three frame counts, 20-40 steps so that denoising dominates the VAE, fixed seeds),
waits for all of them and prints:

- requests/s (jobs / time from first submission to last completion) and mean job
  latency (the server's created_at -> completed_at: encode, denoise, decode), and
  the mean time in the step scheduler's pool (admission -> last step);
- from the scheduler's Prometheus metrics: steps, mean requests and distinct
  shapes per step, transformer forwards per step, mean StepPlan bytes (a new
  request's embeddings included once), and the worker's idle gap between forwards
  as a fraction of the mean step time.

The same script runs against an older checkout (metrics it does not export print
as n/a); the previous design's figures were taken that way at commit 6d66141 and are
kept in benchmarks/results/engine_step_previous_design.json for `--baseline`:

    python -m benchmarks.engine_step --baseline benchmarks/results/engine_step_previous_design.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time

import httpx
import ray
from ray import serve

from api.serve_configs import serve_application
from common.spmd import free_port
from serve_graph.app import build_video_app

HEIGHTS = {"240p": 32, "360p": 48, "480p": 64, "720p": 96}
MIX = list(itertools.product(["cogvideox-tiny", "wan-tiny"], HEIGHTS, [1, 9, 17], [20, 30, 40]))


def app_args(heights: dict[str, int], **overrides: dict) -> dict:
    """configs/local.yaml's video app with CogVideoX and Wan only, at `heights`; `overrides` update its sections."""
    args = serve_application("video")["args"]
    args["models"] = [dict(m, resolution_heights=heights) for m in args["models"]
                      if m["name"] in ("cogvideox-tiny", "wan-tiny")]
    args["scheduler"]["max_pool_size"] = 256
    for section, values in overrides.items():
        args[section] = {**args.get(section, {}), **values}
    return args


def _histogram(text: str, name: str) -> tuple[float, float] | None:
    """(sum, count) of a Ray-exported histogram, over every label set; None if not exported."""
    sums = [float(v) for v in re.findall(rf"^ray_{name}_sum(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    counts = [float(v) for v in re.findall(rf"^ray_{name}_count(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    return (sum(sums), sum(counts)) if counts else None


def _counter(text: str, name: str) -> float | None:
    values = [float(v) for v in re.findall(rf"^ray_{name}_total(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    return sum(values) if values else None


def _mean(text: str, name: str) -> float | None:
    h = _histogram(text, name)
    return h[0] / h[1] if h and h[1] else None


def run(n_requests: int, args: dict, mix: list[tuple] = MIX) -> dict:
    """Serve the video app with `args`, submit `n_requests` jobs of `mix` at once, and measure."""
    metrics_port, port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_video_app(args), name="video", route_prefix="/")
    asks = [dict(model=m, prompt=f"scene {i}", resolution=r, num_frames=f, num_inference_steps=s, seed=i)
            for i, (m, r, f, s) in enumerate(itertools.islice(itertools.cycle(mix[::7] + mix), n_requests))]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            warm = client.post("/v1/videos", json=dict(asks[0], num_inference_steps=2)).json()
            _wait(client, [warm["id"]])
            start = time.time()
            ids = [client.post("/v1/videos", json=a).json()["id"] for a in asks]
            jobs = _wait(client, ids)
            elapsed = max(j["completed_at"] for j in jobs) - start
            time.sleep(12)  # Ray exports metrics every few seconds
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
    failed = [j for j in jobs if j["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not complete: {failed[0]}")
    steps = _histogram(text, "dit_batch_size")
    step_time, gap = _mean(text, "dit_step_duration_seconds"), _mean(text, "dit_step_gap_seconds")
    return {
        "requests": n_requests,
        "requests_per_s": n_requests / elapsed,
        "mean_latency_s": sum(j["completed_at"] - j["created_at"] for j in jobs) / len(jobs),
        "mean_pool_latency_s": _mean(text, "dit_request_latency_seconds"),
        "steps": steps[1] if steps else None,
        "requests_per_step": _mean(text, "dit_batch_size"),
        "shapes_per_step": _mean(text, "dit_step_shapes"),
        "forwards_per_step": _mean(text, "dit_forwards_per_step"),
        "mean_plan_bytes": _mean(text, "dit_plan_bytes"),
        "step_time_s": step_time,
        "step_gap_s": gap,
        "gap_fraction_of_step": gap / step_time if gap is not None and step_time else None,
        "ring_mib": (_counter(text, "dit_ring_bytes") or 0) / 2**20,
    }


def _wait(client: httpx.Client, ids: list[str], timeout: float = 1800) -> list[dict]:
    deadline, jobs = time.time() + timeout, {}
    while len(jobs) < len(ids):
        if time.time() > deadline:
            raise TimeoutError(f"{len(ids) - len(jobs)} jobs still running")
        for job_id in ids:
            if job_id not in jobs:
                job = client.get(f"/v1/videos/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    jobs[job_id] = job
        time.sleep(0.1)
    return [jobs[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--baseline", help="JSON written by --json on the previous design, for the ratios")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    # One rank, as the previous design's single DiT worker: the comparison is of the engine, not of Brick
    # (benchmarks/brick_serving.py compares ring plans on the 2-rank group).
    one_rank = {"ranks": 1, "num_cpus_per_rank": 0.6, "torch_threads": 1}
    figures = run(args.requests, app_args(HEIGHTS, worker_group=one_rank))
    for key, value in figures.items():
        print(f"{key:>22}: {'n/a' if value is None else round(value, 4)}")
    if args.baseline:
        base = json.load(open(args.baseline))
        print(f"\nvs {args.baseline} ({base.get('measured_at', '')}):\n"
              f"  {figures['requests_per_s'] / base['requests_per_s']:.2f}x requests/s, "
              f"{base['mean_latency_s'] / figures['mean_latency_s']:.2f}x lower mean job latency, "
              f"{base['mean_pool_latency_s'] / figures['mean_pool_latency_s']:.2f}x lower mean time in the pool, "
              f"{base['step_time_s'] / figures['step_time_s']:.2f}x shorter steps")
    if args.json:
        json.dump(figures, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
