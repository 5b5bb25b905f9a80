"""Does the service keep quality? Prompt following of the shapes model through the real HTTP app.

The CPU default's first video model (`shapes-t2v`, trained by `python -m models.shapes.train`)
is asked for every caption of its grammar ("a red circle moving left", 60 in all); the
decoded mp4s are read by `models.shapes.scorer` and scored per attribute (colour, shape,
direction). Four ways of serving the same requests (same seeds):

- `1 rank, alone`: one job at a time, each row on one rank;
- `1 rank, batched`: all jobs at once, mixed with `cogvideox-tiny` jobs, steps packing up
  to 8 rows (batching fill, so the batches really form on these saturated cores);
- `2 ranks, alone` / `2 ranks, batched`: the same with every row sharded over a Brick
  ring of both ranks (min_shard_tokens lowered so a 64p row shards).

The target: >= 90% on each attribute alone, batched and sharded within 2 points of it. First
row, the ceiling: the scorer on the checkpoint's own VAE reconstructions of rendered clips
(what the latent space can show at all).

    python -m benchmarks.quality                # all 60 captions, ~10 min on 2 cores
    python -m benchmarks.quality --prompts 12   # the first 12
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from diffusers import AutoencoderKLWan
from ray import serve

from api.serve_configs import serve_application
from common.spmd import free_port
from deployments.media import decode_mp4
from models.shapes.data import Attributes, all_attributes, render_clip
from models.shapes.scorer import accuracy, read_video
from models.shapes.train import to_pixels
from serve_graph.app import build_video_app

MODEL = "shapes-t2v"
CHECKPOINT = "models/shapes/checkpoint"
TARGET, TOLERANCE = 0.90, 0.02


@dataclass(frozen=True)
class Variant:
    name: str
    sharded: bool
    batched: bool


VARIANTS = (Variant("1 rank, alone", False, False), Variant("1 rank, batched", False, True),
            Variant("2 ranks, alone", True, False), Variant("2 ranks, batched", True, True))


def app_args(data_dir: str, sharded: bool) -> dict:
    """configs/local.yaml's video app, steps filled up to 8 rows; `sharded`: every shapes row on a ring of 2."""
    args = copy.deepcopy(serve_application("video")["args"])
    args["store"]["data_dir"] = data_dir
    args["scheduler"] = {**args["scheduler"], "batching": "fill"}
    if sharded:
        args["scheduler"]["planner"] = {**args["scheduler"]["planner"], "min_shard_tokens": 64}
    return args


def wait(client: httpx.Client, job_id: str, timeout_s: float = 900) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"{job_id} not done after {timeout_s} s")


def submit(client: httpx.Client, body: dict, timeout_s: float = 900) -> str:
    """POST a job; an overloaded server (429: the pool is full) is asked again as it drains, as a client should."""
    deadline = time.time() + timeout_s
    response = client.post("/v1/videos", json=body)
    while response.status_code == 429 and time.time() < deadline:
        time.sleep(1.0)
        response = client.post("/v1/videos", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/videos {body}: HTTP {response.status_code} {response.text}")
    return response.json()["id"]


def read_job(client: httpx.Client, job_id: str) -> tuple[Attributes, dict[str, float]]:
    """What the scorer reads in the job's mp4, and the job's stage seconds."""
    job = wait(client, job_id)
    if job["status"] != "completed":
        raise RuntimeError(f"{job_id}: {job['status']} {job.get('error')}")
    return read_video(decode_mp4(client.get(f"/v1/videos/{job_id}/content").content)).attributes, job["stages"]


def score(client: httpx.Client, asked: list[Attributes], batched: bool) -> dict[str, float]:
    """Submit one job per caption (seed = its index), alone in turn or all at once with other models' jobs:
    accuracy per attribute, and (alone) the mean seconds of each stage of a job."""
    bodies = [{"model": MODEL, "prompt": a.caption, "seed": i} for i, a in enumerate(asked)]
    if not batched:
        jobs = [read_job(client, submit(client, b)) for b in bodies]
        stages = {k: sum(s[k] for _, s in jobs) / len(jobs) for k in jobs[0][1]}
        return accuracy([(a, read) for a, (read, _) in zip(asked, jobs)]) | stages
    others = [submit(client, {"model": "cogvideox-tiny", "prompt": "a cat in the rain", "resolution": "240p",
                              "num_inference_steps": 4, "seed": i}) for i in range(0, len(asked), 6)]
    ids = [submit(client, b) for b in bodies]
    read = [read_job(client, i)[0] for i in ids]
    for other in others:
        wait(client, other)
    return accuracy(list(zip(asked, read)))


@torch.no_grad()
def vae_ceiling(asked: list[Attributes], seed: int = 0) -> dict[str, float]:
    """The scorer on the VAE's reconstruction of one rendered clip per caption."""
    vae = AutoencoderKLWan.from_pretrained(CHECKPOINT, subfolder="vae").eval()
    rng, pairs = np.random.default_rng(seed), []
    for attributes in asked:
        clip = to_pixels(render_clip(attributes, rng)[None])
        pixels = vae.decode(vae.encode(clip).latent_dist.mean).sample[0].clamp(-1, 1)
        frames = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        pairs.append((attributes, read_video(frames).attributes))
    return accuracy(pairs)


def run(prompts: int) -> dict[str, dict[str, float]]:
    asked = all_attributes()[:prompts]
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, dict[str, float]] = {"VAE ceiling": vae_ceiling(asked)}
    try:
        for sharded in (False, True):
            with tempfile.TemporaryDirectory(prefix="quality-") as data_dir:
                serve.run(build_video_app(app_args(data_dir, sharded)), name="video", route_prefix="/")
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    for variant in (v for v in VARIANTS if v.sharded == sharded):
                        results[variant.name] = score(client, asked, variant.batched)
                        print(f"{variant.name:18s} {json.dumps(results[variant.name])}", flush=True)
                serve.delete("video")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(all_attributes()))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = run(args.prompts)
    base = results[VARIANTS[0].name]
    print(f"\n{MODEL}, {args.prompts} captions; accuracy per attribute (colour / shape / direction / all three)")
    for name, row in results.items():
        delta = max(abs(row[k] - base[k]) for k in ("colour", "shape", "direction"))
        print(f"  {name:18s} " + "  ".join(f"{k} {row[k]:6.1%}" for k in ("colour", "shape", "direction", "all"))
              + f"   max delta vs alone {delta:.1%}")
    stages = {k.removesuffix("_s"): v for k, v in base.items() if k.endswith("_s")}
    print("  a job alone, mean seconds per stage: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    alone_ok = all(base[k] >= TARGET for k in ("colour", "shape", "direction"))
    kept = all(abs(results[v.name][k] - base[k]) <= TOLERANCE + 1e-9 for v in VARIANTS
               for k in ("colour", "shape", "direction"))
    print(f"target >= {TARGET:.0%} per attribute alone: {'met' if alone_ok else 'MISSED'}; batched and sharded "
          f"within {TOLERANCE:.0%}: {'met' if kept else 'MISSED'}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
