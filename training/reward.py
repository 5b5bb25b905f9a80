"""Sparse outcome reward of DeepCoder: 1 if the response's code passes every selected test, else 0.

- The code is the last fenced block of the response (```python ... ``` or ``` ... ```);
  no block -> reward 0 with reason "format".
- The `tests_per_problem` (15) hardest tests are run, hardest = longest input; a
  problem with fewer runs all of them.
- Each test runs in its own sandboxed process (`training.sandbox`) with a per-test
  timeout configurable in [6, 12] s; the first failing test ends the evaluation.
- No partial credit.
`RewardPool` scores many responses in parallel (bounded) and yields each result as
it completes, which is what the trainer's pipelining needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal

from training.judge import stdout_matches, values_match
from training.problems import Problem, TestCase
from training.sandbox import RunResult, SandboxLimits, run_python

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
Verdict = Literal["passed", "wrong_answer", "runtime_error", "timeout", "memory", "output_limit"]


def extract_code(response: str) -> str | None:
    """The last fenced code block of a response, or None."""
    blocks = FENCE.findall(response)
    return blocks[-1][1] if blocks else None


def select_tests(tests: Iterable[TestCase], n: int) -> list[TestCase]:
    """The n tests with the longest inputs (stable for ties)."""
    return sorted(tests, key=lambda t: -t.size)[:n]


@dataclass(frozen=True)
class RewardConfig:
    tests_per_problem: int = 15
    timeout_s: float = 6.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 6 <= self.timeout_s <= 12:
            raise ValueError(f"timeout_s must be in [6, 12] s (DeepCoder's range), got {self.timeout_s}")
        if self.tests_per_problem < 1:
            raise ValueError("tests_per_problem must be >= 1")

    @property
    def limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                             max_output_bytes=self.max_output_bytes)


@dataclass(frozen=True)
class RewardResult:
    problem_id: str
    reward: float
    reason: str  # "passed", "format", "no_tests", or the first failing test's verdict
    verdicts: tuple[Verdict, ...] = field(default=())


def run_test(code: str, test: TestCase, limits: SandboxLimits) -> Verdict:
    if test.kind == "functional":
        result: RunResult = run_python(code, limits=limits, call={"fn_name": test.fn_name, "args": test.input})
        ok = result.status == "ok" and values_match(result.value, test.output)
    else:
        result = run_python(code, stdin=test.input, limits=limits)
        ok = result.status == "ok" and stdout_matches(result.stdout, test.output)
    if ok:
        return "passed"
    return "wrong_answer" if result.status == "ok" else result.status


def score_code(problem: Problem, code: str, config: RewardConfig = RewardConfig()) -> RewardResult:
    tests = select_tests(problem.tests, config.tests_per_problem)
    if not tests:
        return RewardResult(problem.id, 0.0, "no_tests")
    verdicts: list[Verdict] = []
    for test in tests:
        verdicts.append(run_test(code, test, config.limits))
        if verdicts[-1] != "passed":
            return RewardResult(problem.id, 0.0, verdicts[-1], tuple(verdicts))
    return RewardResult(problem.id, 1.0, "passed", tuple(verdicts))


def score_response(problem: Problem, response: str, config: RewardConfig = RewardConfig()) -> RewardResult:
    code = extract_code(response)
    if code is None:
        return RewardResult(problem.id, 0.0, "format")
    return score_code(problem, code, config)


class RewardPool:
    """Bounded parallel scoring; each job's tests run one after another in sandboxed processes."""

    def __init__(self, workers: int = 2, config: RewardConfig = RewardConfig()) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

    def submit(self, problem: Problem, response: str) -> Future[RewardResult]:
        return self._executor.submit(score_response, problem, response, self.config)

    def score_as_completed(self, jobs: Iterable[tuple[Problem, str]]) -> Iterator[tuple[int, RewardResult]]:
        """(index of the job, result) in completion order."""
        futures = {self.submit(p, r): i for i, (p, r) in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
