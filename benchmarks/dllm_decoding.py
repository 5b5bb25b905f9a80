"""Fast-dLLM's speed-ups vs Dream's exact decoder: request-steps, seconds and agreement.

The same prompts, seeds and model decode through the engine's scheduler core and dLLM
runner (all requests packed in each step), once per variant:
- `exact`: Dream's schedule (`steps` = `max_tokens`, one token per step);
- `threshold`: + `confidence_threshold` (parallel unmasking of every sure position);
- `blocks`: block-wise decoding (`block_length`), exact for its own schedule;
- `blocks+cache`: the same with the prefix KV cache (each block's first step computes
  everything, its other steps only the block and what follows).
Prints request-steps, wall seconds and speed against `exact`, and how many responses and
tokens agree with `exact` (and, for the cache, with `blocks`, the decoder it approximates). On this machine the model is the tiny random-weight Dream checkpoint
(`models.dllm.tiny`), whose confidences say little about a trained model's: the figures
check the mechanism and its bookkeeping; run it with `--checkpoint` on real weights for
the trade-off itself.

    python -m benchmarks.dllm_decoding [--threshold 0.9] [--block-length 16] [--checkpoint DIR]
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
from models.dllm.checkpoint import load_dllm, load_dllm_tokenizer
from models.dllm.config import stop_token_ids
from models.dllm.decoding import DecodeParams
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


def agreement(reference: dict[str, list[int]], other: dict[str, list[int]]) -> str:
    same = sum(reference[k] == other[k] for k in reference)
    tokens = sum(max(len(reference[k]), len(other[k])) for k in reference)
    agree = sum(a == b for k in reference for a, b in zip(reference[k], other[k]))
    return f"{same}/{len(reference)} responses, {agree}/{tokens} tokens ({agree / max(tokens, 1):.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", help="a Dream-layout checkpoint directory (default: the tiny model)")
    parser.add_argument("--init-std", type=float, default=0.2,
                        help="the tiny model's weight scale: larger makes its predictions surer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoint:
        network, tokenizer = load_dllm(args.checkpoint), load_dllm_tokenizer(args.checkpoint)
    else:
        network, tokenizer = build_tiny_dllm(seed=0, init_std=args.init_std)
    model = DllmModel(network, network.config.mask_token_id, stop_token_ids(network.config, tokenizer))
    variants = {"exact": {}, "threshold": {"confidence_threshold": args.threshold},
                "blocks": {"block_length": args.block_length},
                "blocks+cache": {"block_length": args.block_length, "prefix_cache": True}}
    runs = {}
    for name, knobs in variants.items():
        requests = [NewDllmRequest(f"p{i}", "bench", tuple(tokenizer.encode(p)),
                                   DecodeParams(max_tokens=args.max_tokens, steps=args.max_tokens, alg="maskgit_plus",
                                                seed=i, **knobs))
                    for i, p in enumerate(PROMPTS)]
        runs[name] = decode_all(model, requests)
    exact, _, exact_s, exact_steps = runs["exact"]
    print(f"{len(PROMPTS)} requests, max_tokens {args.max_tokens}, maskgit_plus, packed together; threshold "
          f"{args.threshold}, block_length {args.block_length}")
    print("| variant | request-steps | seconds | speed vs exact | agreement with exact |")
    print("| --- | --- | --- | --- | --- |")
    for name, (out, _, seconds, steps) in runs.items():
        print(f"| {name} | {steps} | {seconds:.2f} | {exact_s / seconds:.2f}x | {agreement(exact, out)} |")
    print(f"prefix cache vs block-wise without it: {agreement(runs['blocks'][0], runs['blocks+cache'][0])}, "
          f"{runs['blocks'][2] / runs['blocks+cache'][2]:.2f}x the speed")


if __name__ == "__main__":
    main()
