"""Sandbox throughput: 64 solutions x 15 tests on this machine, and the cost per test vs a bare run.

Workload: one stdin problem with 15 tests (sum of n integers, n up to 2,000) and 64
correct solutions written in 4 styles, so every test runs. Sandboxed: the training
reward (`RewardPool`, one sandboxed process per test, --workers in parallel). Bare:
the same 960 program runs as plain `python file.py` subprocesses with the same
parallelism and no limits. Prints tests/s for both and the overhead per test.

    python -m benchmarks.sandbox_throughput [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.problems import Problem, TestCase
from training.reward import RewardConfig, RewardPool

STYLES = [
    "n = int(input())\nprint(sum(map(int, input().split())))",
    "import sys\ndata = sys.stdin.read().split()\nprint(sum(int(x) for x in data[1:]))",
    "n = int(input())\ntotal = 0\nfor x in input().split():\n    total += int(x)\nprint(total)",
    "from functools import reduce\ninput()\nprint(reduce(lambda a, b: a + b, map(int, input().split()), 0))",
]


def workload(solutions: int = 64, tests: int = 15) -> tuple[Problem, list[str]]:
    rng = random.Random(0)
    cases = []
    for i in range(tests):
        values = [rng.randint(-10**6, 10**6) for _ in range(1 + i * 140)]
        cases.append(TestCase(kind="stdin", input=f"{len(values)}\n{' '.join(map(str, values))}\n",
                              output=f"{sum(values)}\n"))
    problem = Problem(id="sum-n", source="benchmark", statement="sum of n integers", tests=tuple(cases))
    return problem, [STYLES[i % len(STYLES)] for i in range(solutions)]


def sandboxed(problem: Problem, codes: list[str], workers: int) -> float:
    started = time.perf_counter()
    with RewardPool(workers, RewardConfig(tests_per_problem=15)) as pool:
        results = [r for _, r in pool.score_as_completed((problem, f"```python\n{c}\n```") for c in codes)]
    assert all(r.reward == 1.0 for r in results), {r.reason for r in results}
    return time.perf_counter() - started


def bare(problem: Problem, codes: list[str], workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, code in enumerate(codes):
            path = Path(tmp, f"s{i}.py")
            path.write_text(code)
            files.append(path)

        def run_all(path: Path) -> None:
            for test in problem.tests:
                out = subprocess.run([sys.executable, str(path)], input=test.input, capture_output=True, text=True)
                assert out.stdout == test.output

        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run_all, files))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    problem, codes = workload()
    runs = len(codes) * len(problem.tests)
    t_bare = bare(problem, codes, args.workers)
    t_box = sandboxed(problem, codes, args.workers)
    print(f"{len(codes)} solutions x {len(problem.tests)} tests = {runs} runs, {args.workers} workers")
    print(f"  bare python : {runs / t_bare:7.1f} tests/s ({t_bare / runs * 1000:.1f} ms per test, wall)")
    print(f"  sandboxed   : {runs / t_box:7.1f} tests/s ({t_box / runs * 1000:.1f} ms per test, wall)")
    print(f"  overhead    : {(t_box - t_bare) / runs * 1000:+.1f} ms per test ({t_box / t_bare:.2f}x bare)")


if __name__ == "__main__":
    main()
