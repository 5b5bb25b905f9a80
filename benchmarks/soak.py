"""Soak: the video app of configs/local.yaml for N minutes at ~80% of its measured capacity, with bursts.

Starts the app on a fresh data directory, measures its capacity (jobs of the workload
mix submitted at once: completed jobs per second of their makespan, the throughput the
app sustains when saturated), then offers `--load` x capacity on average: a burst of
`--burst` jobs every `--burst-every` seconds and a Poisson stream for the rest of that
rate, polling every job to its end. Every minute it prints jobs submitted / completed / refused (429) / lost, the
p50/p95 job latency of that minute and the RSS of every Serve replica; at the end it
drains, prints the totals (lost must be 0: a job that failed or never ended) and each
replica's RSS growth.

    python -m benchmarks.soak [--minutes 10] [--load 0.8] [--burst 4] [--burst-every 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from api.serve_configs import serve_application
from common.spmd import free_port

MIX = [dict(model="cogvideox-tiny", resolution="240p", num_frames=9, num_inference_steps=8),
       dict(model="wan-tiny", resolution="240p", num_frames=9, num_inference_steps=8),
       dict(model="cogvideox-tiny", resolution="360p", num_frames=9, num_inference_steps=8)]
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Tally:
    submitted: int = 0
    refused: int = 0
    completed: list[tuple[float, float]] = field(default_factory=list)  # (end time, latency)
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def replica_rss() -> dict[str, float]:
    """MiB of resident memory of every Serve replica process on this node, by its actor name."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        name = " ".join(proc.info["cmdline"] or [])
        if name.startswith(prefix := "ray::ServeReplica:video:"):
            label = f"{name.removeprefix(prefix).split('.')[0].split()[0]}[{proc.pid}]"
            out[label] = proc.info["memory_info"].rss / 2**20
    return out


def run_job(client: httpx.Client, body: dict, tally: Tally, timeout_s: float = 600) -> None:
    start = time.time()
    r = client.post("/v1/videos", json=body)
    with tally.lock:
        tally.submitted += 1
        if r.status_code == 429:
            tally.refused += 1
            return
    if r.status_code != 202:
        with tally.lock:
            tally.lost.append(f"submit {r.status_code}: {r.text[:200]}")
        return
    job_id = r.json()["id"]
    while time.time() - start < timeout_s:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in TERMINAL:
            with tally.lock:
                if job["status"] == "completed":
                    tally.completed.append((time.time(), time.time() - start))
                else:
                    tally.lost.append(f"{job_id} {job['status']}: {job.get('error')}")
            return
        time.sleep(0.5)
    with tally.lock:
        tally.lost.append(f"{job_id} did not end in {timeout_s} s")


def measure_capacity(client: httpx.Client, jobs: int = 12) -> float:
    """Jobs per second when the app is saturated: `jobs` of the mix submitted at once, over their makespan."""
    tally = Tally()
    start = time.time()
    threads = [threading.Thread(target=run_job, args=(client, {**MIX[i % len(MIX)], "prompt": f"calibrate {i}",
                                                               "seed": i}, tally), daemon=True) for i in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if tally.lost or tally.refused:
        raise RuntimeError(f"calibration jobs failed or were refused: {tally.lost}, {tally.refused} refused")
    return jobs / (max(end for end, _ in tally.completed) - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.8, help="Poisson rate as a share of the measured capacity")
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--burst-every", type=float, default=60)
    args = parser.parse_args()

    import ray
    from ray import serve

    from serve_graph.app import build_video_app

    port = free_port()
    data = tempfile.mkdtemp(prefix="soak-")
    app_args = serve_application("video")["args"]
    app_args["store"]["data_dir"] = data
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_video_app(app_args), name="video", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        capacity = measure_capacity(client)
        rate = args.load * capacity - args.burst / args.burst_every  # the bursts are part of the offered load
        if rate <= 0:
            raise SystemExit(f"bursts of {args.burst} every {args.burst_every:.0f} s alone exceed {args.load} x the "
                             f"capacity of {capacity:.3f} jobs/s")
        print(f"capacity {capacity:.3f} jobs/s (saturated); Poisson rate {rate:.3f} jobs/s + bursts of "
              f"{args.burst} every {args.burst_every:.0f} s = {args.load:g} x capacity, for {args.minutes:g} min "
              f"(data dir {data})", flush=True)
        tally, threads, rng = Tally(), [], random.Random(0)
        rss_start = replica_rss()
        start = next_burst = time.time()
        next_report, i = start + 60, 0
        while time.time() - start < args.minutes * 60:
            now = time.time()
            batch = 1
            if now >= next_burst:
                batch, next_burst = args.burst, now + args.burst_every
            for _ in range(batch):
                body = {**MIX[i % len(MIX)], "prompt": f"soak {i}", "seed": i}
                thread = threading.Thread(target=run_job, args=(client, body, tally), daemon=True)
                thread.start()
                threads.append(thread)
                i += 1
            time.sleep(rng.expovariate(rate))
            if time.time() >= next_report:
                report(tally, next_report - 60, next_report)
                next_report += 60
        for thread in threads:
            thread.join()
        report(tally, start, time.time(), label="total")
        rss_end = replica_rss()
        print("RSS growth per replica (MiB): " + ", ".join(
            f"{name} {rss_start.get(name, 0):.0f} -> {rss_end[name]:.0f}" for name in sorted(rss_end)))
        print(f"lost: {len(tally.lost)}" + "".join(f"\n  {line}" for line in tally.lost[:20]))
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()


def report(tally: Tally, since: float, until: float, label: str | None = None) -> None:
    with tally.lock:
        latencies = sorted(lat for end, lat in tally.completed if since <= end < until)
        submitted, refused, lost = tally.submitted, tally.refused, len(tally.lost)
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    rss = ", ".join(f"{n} {v:.0f}" for n, v in sorted(replica_rss().items()))
    print(f"[{label or f'{(until - since) / 60:.0f} min to t={until:.0f}'}] submitted {submitted}, completed "
          f"{len(latencies)} (this window), refused {refused}, lost {lost}; latency p50 {p50:.1f} s p95 {p95:.1f} s;"
          f" RSS MiB: {rss}", flush=True)


if __name__ == "__main__":
    main()
