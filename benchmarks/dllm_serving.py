"""Diffusion-LM app through Ray Serve: step batching vs one request at a time, and an AR coder for reference.

Three sides, one after the other on the same machine, each through HTTP with the
`openai` async client and the same workload (code prompts of different lengths,
`max_tokens` cycling over 32 / 64 / 128, fixed seeds, at most `concurrency` in flight):

- `batched`: the dLLM app of configs/local.yaml (every step packs up to 16 requests);
- `serial`:  the same app and engine with `scheduler.budget.max_batch_size: 1`;
- `ar-vllm`: the tiny AR coder of configs/local.yaml on vLLM (same hidden size, layers,
  vocabulary), asked for the same token counts (ignore_eos), as a reference point.

Prints output tokens/s and mean request latency per side at concurrency 1 / 8 / 32,
and the ratios batched/serial from the same run.

    python -m benchmarks.dllm_serving [--concurrency 1 8 32] [--requests-per-level 2] [--no-ar]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import time
from dataclasses import dataclass

from api.serve_configs import serve_application
from common.spmd import free_port

MAX_TOKENS = (32, 64, 128)


@dataclass
class Level:
    side: str
    concurrency: int
    seconds: float
    output_tokens: int
    latencies: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def mean_latency(self) -> float:
        return statistics.mean(self.latencies)


def workload(n: int) -> list[dict]:
    """n requests: prompts of 4..40 words, response lengths cycling over MAX_TOKENS, seed i."""
    return [{"prompt": f"def solve_{i}(nums: list[int]) -> int:\n    " + "# step " * (i % 10) * 4,
             "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)], "seed": i} for i in range(n)]


async def measure(side: str, base_url: str, model: str, requests: list[dict], concurrency: int,
                  extra_body: dict | None = None) -> Level:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(request: dict) -> tuple[float, int]:
        async with gate:
            start = time.perf_counter()
            r = await client.completions.create(model=model, extra_body=extra_body, **request)
            return time.perf_counter() - start, r.usage.completion_tokens

    start = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    seconds = time.perf_counter() - start
    await client.close()
    return Level(side, concurrency, seconds, sum(t for _, t in done), [s for s, _ in done])


def run_levels(side: str, base_url: str, model: str, args, extra_body: dict | None = None) -> list[Level]:
    levels = []
    asyncio.run(measure(side, base_url, model, workload(4), 4, extra_body))  # warm-up, not counted
    for concurrency in args.concurrency:
        requests = workload(max(args.requests_per_level * concurrency, 8))
        levels.append(asyncio.run(measure(side, base_url, model, requests, concurrency, extra_body)))
        print(f"  {side:>8} c={concurrency:<3} {levels[-1].tokens_per_second:8.1f} tok/s, "
              f"mean latency {levels[-1].mean_latency:.3f} s", flush=True)
    return levels


def dllm_args(max_batch_size: int) -> dict:
    args = copy.deepcopy(serve_application("dllm")["args"])
    args["scheduler"]["budget"]["max_batch_size"] = max_batch_size
    args["scheduler"]["max_pool_size"] = 256
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=2, help="requests = this x concurrency (min 8)")
    parser.add_argument("--no-ar", action="store_true", help="skip the AR vLLM reference side")
    args = parser.parse_args()

    import ray
    from ray import serve

    from serve_graph.coder_app import build_coder_app
    from serve_graph.dllm_app import build_dllm_app

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    model = serve_application("dllm")["args"]["models"][0]["name"]
    results: dict[str, list[Level]] = {}
    try:
        for side, batch in (("batched", 16), ("serial", 1)):
            serve.run(build_dllm_app(dllm_args(batch)), name=side, route_prefix=f"/{side}")
            results[side] = run_levels(side, f"{base}/{side}", model, args)
            serve.delete(side)
        if not args.no_ar:
            coder = serve_application("coder")["args"]
            serve.run(build_coder_app(coder), name="coder", route_prefix="/coder")
            results["ar-vllm"] = run_levels("ar-vllm", f"{base}/coder", coder["model_id"], args,
                                            extra_body={"ignore_eos": True})
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nworkload: completions of {'/'.join(map(str, MAX_TOKENS))} tokens (dLLM: the config's steps = "
          "max_tokens / tokens_per_step), tiny models (hidden 128, 2 layers), 2 CPU cores")
    print("| concurrency | side | output tok/s | mean latency |")
    print("| --- | --- | --- | --- |")
    for i, concurrency in enumerate(args.concurrency):
        for side, levels in results.items():
            print(f"| {concurrency} | {side} | {levels[i].tokens_per_second:.1f} | {levels[i].mean_latency:.3f} s |")
    for i, concurrency in enumerate(args.concurrency):
        b, s = results["batched"][i], results["serial"][i]
        print(f"concurrency {concurrency}: batched/serial throughput {b.tokens_per_second / s.tokens_per_second:.2f}x, "
              f"mean latency {s.mean_latency / b.mean_latency:.2f}x lower")


if __name__ == "__main__":
    main()
