"""Step caches through the real HTTP app: steps saved, denoising time, fidelity to the uncached video, and latency
under load.

The CPU default's video app (`configs/local.yaml`, its shipped scheduler) serves the shapes
model (`shapes-t2v`: a Wan model trained by the project, 20 steps, MagCache ratios and TeaCache
coefficients calibrated by `python -m api.cache_calibration`). Two parts, one deployment:

1. Alone: every caption of a fixed set (seed = its index) is generated once per cache
   setting, one job at a time, the settings taking turns per caption (the machine's speed
   drifts; turns share it). Per setting: the fraction of steps that ran the transformer
   (the job's `computed_steps`), the job's `denoise_s` stage (mean, 95% interval, and the
   uncached mean over it), PSNR and SSIM (scikit-image) of the decoded mp4's frames against
   the uncached job of the same seed, and the scorer's prompt following (colour, shape and
   direction all right).
2. Under load: a Poisson trace of shapes jobs (captions and seeds drawn per job) at
   `--load` times the uncached alone rate (1 / its mean alone latency), replayed uncached and
   with one cache setting in turns, `--rounds` times each: mean latency per run, the mean
   over runs with its 95% interval, and the ratio.

The issue's targets: at PSNR >= 30 dB against uncached, >= 1.5x lower denoising time per
job, and a lower mean latency under load than uncached.

    python -m benchmarks.step_cache                           # 12 captions, the trace 3 rounds (~15 min)
    python -m benchmarks.step_cache --prompts 6 --rounds 2    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from api.serve_configs import serve_application
from benchmarks.end_to_end import interval
from benchmarks.quality import submit, wait
from benchmarks.real_run import replay
from benchmarks.workloads import TraceRequest, arrival_times
from common.spmd import free_port
from deployments.media import decode_mp4
from models.shapes.data import Attributes, all_attributes
from models.shapes.scorer import read_video
from serve_graph.app import build_video_app

MODEL = "shapes-t2v"
SETTINGS: dict[str, dict] = {
    "none": {"mode": "none"},
    "taylorseer interval 2": {"mode": "taylorseer", "interval": 2},
    "taylorseer interval 3": {"mode": "taylorseer", "interval": 3},
    "magcache 0.06": {"mode": "magcache", "threshold": 0.06},
    "magcache 0.12": {"mode": "magcache", "threshold": 0.12},
    "magcache 0.24": {"mode": "magcache", "threshold": 0.24},
    "first_block 0.1": {"mode": "first_block", "threshold": 0.1},
    "first_block 0.2": {"mode": "first_block", "threshold": 0.2},
    "first_block 0.3": {"mode": "first_block", "threshold": 0.3},
    "teacache 0.1": {"mode": "teacache", "threshold": 0.1},
    "teacache 0.2": {"mode": "teacache", "threshold": 0.2},
    "teacache 0.3": {"mode": "teacache", "threshold": 0.3},
}
PSNR_TARGET, SPEEDUP_TARGET = 30.0, 1.5


def captions(n: int) -> list[Attributes]:
    """`n` captions spread over the grammar (every colour, shape and motion appear for n >= 12)."""
    every = all_attributes()
    return [every[(i * 37) % len(every)] for i in range(n)]


def body(caption: str, seed: int, cache: dict) -> dict:
    return {"model": MODEL, "prompt": caption, "seed": seed, "cache": cache}


def run_alone(client: httpx.Client, asked: list[Attributes]) -> dict[str, list[dict]]:
    """Per setting, per caption: the job's denoise seconds, latency, computed steps, frames and what the scorer read."""
    out: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for seed, attributes in enumerate(asked):
        for name, cache in SETTINGS.items():
            job = wait(client, submit(client, body(attributes.caption, seed, cache)))
            if job["status"] != "completed":
                raise RuntimeError(f"{name}, {attributes.caption!r}: {job['status']} {job.get('error')}")
            frames = decode_mp4(client.get(f"/v1/videos/{job['id']}/content").content)
            out[name].append({"denoise_s": job["stages"]["denoise_s"], "computed": job["computed_steps"],
                              "latency_s": job["completed_at"] - job["created_at"], "frames": frames,
                              "followed": read_video(frames).attributes == attributes})
    return out


def fidelity(reference: np.ndarray, frames: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, over the whole clip; 100 where equal) and mean per-frame SSIM of uint8 frames (T, H, W, 3)."""
    psnr = 100.0 if np.array_equal(reference, frames) else peak_signal_noise_ratio(reference, frames, data_range=255)
    ssim = statistics.mean(structural_similarity(a, b, channel_axis=-1, data_range=255)
                           for a, b in zip(reference, frames))
    return float(psnr), float(ssim)


def summarise_alone(runs: dict[str, list[dict]], steps: int) -> dict[str, dict]:
    base = statistics.mean(r["denoise_s"] for r in runs["none"])
    table = {}
    for name, jobs in runs.items():
        scores = [fidelity(ref["frames"], job["frames"]) for ref, job in zip(runs["none"], jobs)]
        denoise, half = interval([j["denoise_s"] for j in jobs])
        table[name] = {"computed_fraction": statistics.mean(j["computed"] for j in jobs) / steps,
                       "denoise_s": denoise, "denoise_interval_s": half, "speedup": base / denoise,
                       "psnr_db": statistics.mean(p for p, _ in scores), "psnr_min_db": min(p for p, _ in scores),
                       "ssim": statistics.mean(s for _, s in scores),
                       "followed": statistics.mean(j["followed"] for j in jobs),
                       "latency_s": statistics.mean(j["latency_s"] for j in jobs)}
    return table


def load_trace(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    every = all_attributes()
    return [TraceRequest(id=f"shapes-{i}", arrival_s=float(t), model="wan", resolution="64p", num_frames=9, steps=20,
                         prompt=every[int(rng.integers(len(every)))].caption, seed=int(rng.integers(2**31)))
            for i, t in enumerate(arrival_times(n, rate, 1.0, rng))]


def run_load(base_url: str, trace: list[TraceRequest], setting: str, rounds: int) -> dict[str, list[float]]:
    """Mean latency of each replay of the trace, uncached and under `setting`, in turns."""
    out: dict[str, list[float]] = {"none": [], setting: []}
    for _ in range(rounds):
        for name in out:
            outcomes = asyncio.run(replay(base_url, trace, lambda r, steps=None, c=SETTINGS[name]:
                                          {**body(r.prompt, r.seed, c), "num_inference_steps": steps or r.steps}))
            if any(o.status != "completed" for o in outcomes):
                raise RuntimeError(f"{name}: {[o.status for o in outcomes if o.status != 'completed']}")
            out[name].append(statistics.mean(o.latency_s for o in outcomes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=24, help="jobs in the load trace")
    parser.add_argument("--load", type=float, default=0.8, help="arrival rate over the uncached alone rate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setting", default="magcache 0.12", choices=[s for s in SETTINGS if s != "none"],
                        help="the cache of the load trace")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    spec_args = copy.deepcopy(serve_application("video")["args"])
    steps = next(m for m in spec_args["models"] if m["name"] == MODEL)["default_steps"]
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with tempfile.TemporaryDirectory(prefix="step-cache-") as data_dir:
            spec_args["store"]["data_dir"] = data_dir
            serve.run(build_video_app(spec_args), name="video", route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                wait(client, submit(client, body("a red circle moving left", 0, {"mode": "none"})))  # warm-up
                alone = summarise_alone(run_alone(client, captions(args.prompts)), steps)
            rate = args.load / alone["none"]["latency_s"]
            load = run_load(f"http://127.0.0.1:{port}", load_trace(args.jobs, rate), args.setting, args.rounds)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{MODEL}, {args.prompts} captions, {steps} steps, alone through the app (PSNR / SSIM vs uncached)")
    print(f"  {'setting':22s} {'computed':>8s} {'denoise s':>16s} {'speedup':>7s} {'PSNR dB':>13s} {'SSIM':>6s} "
          f"{'followed':>8s}")
    for name, row in alone.items():
        print(f"  {name:22s} {row['computed_fraction']:8.0%} {row['denoise_s']:8.3f} ± {row['denoise_interval_s']:.3f}"
              f" {row['speedup']:6.2f}x {row['psnr_db']:6.1f} ({row['psnr_min_db']:4.1f}) {row['ssim']:6.3f} "
              f"{row['followed']:8.0%}")
    met = [n for n, r in alone.items() if n != "none" and r["psnr_db"] >= PSNR_TARGET and r["speedup"] >= SPEEDUP_TARGET]
    print(f"target (PSNR >= {PSNR_TARGET:.0f} dB and >= {SPEEDUP_TARGET}x lower denoise time): "
          f"{'met by ' + ', '.join(met) if met else 'MISSED by every setting'}")
    means = {name: interval(runs) for name, runs in load.items()}
    print(f"\nPoisson trace, {args.jobs} jobs at {rate:.2f}/s ({args.load} x the uncached alone rate), "
          f"{args.rounds} rounds; mean latency per run")
    for name, runs in load.items():
        print(f"  {name:22s} " + " ".join(f"{v:6.2f}" for v in runs)
              + f"   mean {means[name][0]:.2f} ± {means[name][1]:.2f} s")
    print(f"  uncached / {args.setting}: {means['none'][0] / means[args.setting][0]:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({"alone": alone, "load": load, "rate": rate}, indent=1))


if __name__ == "__main__":
    main()
