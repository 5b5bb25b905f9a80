"""Fast-dLLM's confidence-threshold unmasking vs Dream's exact schedule: steps, seconds and agreement.

The same prompts, seeds and model decode twice through the engine's scheduler core and
dLLM runner (all requests packed in each step): with Dream's schedule (`steps` =
`max_tokens`, the exact decoder) and with `confidence_threshold` added. Prints forwards
run, wall seconds and their ratio, and how many responses and tokens agree with the
exact decoder. On this machine the model is the tiny random-weight Dream checkpoint
(`models.dllm.tiny`), whose confidences say little about a trained model's: the figures
check the mechanism and its bookkeeping; run it with `--checkpoint` on real weights for
the trade-off itself.

    python -m benchmarks.dllm_decoding [--threshold 0.9] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.config import BudgetConfig
from engine.dllm_runner import DllmModel, DllmRunner
from engine.messages import NewDllmRequest
from engine.policies import make_policy
from engine.scheduler import StepSchedulerCore
from models.dllm import DecodeParams, load_dllm
from models.dllm.config import stop_token_ids
from models.dllm.tiny import build_tiny_dllm

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:\n    def push(self, x):",
           "# sort a list of numbers\n", "def is_prime(n: int) -> bool:", "for line in open(path):",
           "async def fetch(url):", "x = {k: v for k, v in"]


def decode_all(model: DllmModel, requests: list[NewDllmRequest]) -> tuple[dict[str, list[int]], int, float, int]:
    """Responses, packed forwards run, wall seconds and the steps the requests ran in all, decoded together."""
    core = StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=len(requests)))
    runner = DllmRunner({"bench": model})
    for request in requests:
        core.admit(request)
    out, forwards, start = {}, 0, time.perf_counter()
    while core.pool:
        plan = core.schedule()
        result = runner.execute(plan)
        forwards += result.forwards
        out.update({k: v.tolist() for k, v in result.finished.items()})
        core.postprocess(plan, result)
    return out, forwards, time.perf_counter() - start, sum(m.steps_done for m in core.pop_done())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", help="a Dream-layout checkpoint directory (default: the tiny model)")
    parser.add_argument("--init-std", type=float, default=0.2,
                        help="the tiny model's weight scale: larger makes its predictions surer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoint:
        from transformers import AutoTokenizer

        network, tokenizer = load_dllm(args.checkpoint), AutoTokenizer.from_pretrained(args.checkpoint)
    else:
        network, tokenizer = build_tiny_dllm(seed=0, init_std=args.init_std)
    model = DllmModel(network, network.config.mask_token_id, stop_token_ids(network.config, tokenizer))

    def requests(threshold: float | None) -> list[NewDllmRequest]:
        return [NewDllmRequest(f"p{i}", "bench", tuple(tokenizer.encode(p)),
                               DecodeParams(max_tokens=args.max_tokens, steps=args.max_tokens, alg="maskgit_plus",
                                            confidence_threshold=threshold, seed=i))
                for i, p in enumerate(PROMPTS)]

    exact, exact_forwards, exact_s, exact_steps = decode_all(model, requests(None))
    fast, fast_forwards, fast_s, fast_steps = decode_all(model, requests(args.threshold))
    same = sum(exact[k] == fast[k] for k in exact)
    tokens = sum(max(len(exact[k]), len(fast[k])) for k in exact)
    agree = sum(a == b for k in exact for a, b in zip(exact[k], fast[k]))
    print(f"{len(PROMPTS)} requests, max_tokens {args.max_tokens}, maskgit_plus, packed together")
    print(f"exact schedule: {exact_steps} request-steps in {exact_forwards} packed forwards, {exact_s:.2f} s")
    print(f"confidence_threshold {args.threshold}: {fast_steps} request-steps in {fast_forwards} packed forwards, "
          f"{fast_s:.2f} s ({exact_steps / fast_steps:.2f}x fewer request-steps, {exact_s / fast_s:.2f}x the speed)")
    print(f"agreement with the exact decoder: {same}/{len(exact)} responses identical, "
          f"{agree}/{tokens} tokens ({agree / max(tokens, 1):.1%})")


if __name__ == "__main__":
    main()
