"""A toy verifiable coding task set for the CPU end-to-end run.

Each problem asks for `solve(a, b)` returning a simple expression of two integers,
described in words ("the larger of a and b"), with 5 functional unit tests. Training
problems use two phrasings; held-out problems use a third phrasing of the same
operations, so a rise in held-out reward means the policy learned the operations,
not the strings. Reference solutions are fenced code blocks, as the reward expects.
"""

from __future__ import annotations

import random

from training.problems import Problem, TestCase

OPERATIONS = [
    ("sum", "the sum of a and b", "a + b", lambda a, b: a + b),
    ("difference", "a minus b", "a - b", lambda a, b: a - b),
    ("product", "the product of a and b", "a * b", lambda a, b: a * b),
    ("larger", "the larger of a and b", "max(a, b)", max),
    ("smaller", "the smaller of a and b", "min(a, b)", min),
    ("first", "a unchanged", "a", lambda a, b: a),
    ("second", "b unchanged", "b", lambda a, b: b),
    ("double", "twice a", "2 * a", lambda a, b: 2 * a),
]
TRAIN_PHRASINGS = ["Write a function solve(a, b) that returns {desc}.", "Implement solve(a, b): return {desc}."]
HELD_OUT_PHRASINGS = ["Write a function solve(a, b) which returns {desc}."]


def solution(expr: str) -> str:
    return f"```python\ndef solve(a, b):\n    return {expr}\n```"


def make_problems(phrasings: list[str], copies: int, seed: int, prefix: str) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for c in range(copies):
        for name, desc, expr, fn in OPERATIONS:
            for p, phrasing in enumerate(phrasings):
                args = [[rng.randint(-20, 20), rng.randint(-20, 20)] for _ in range(5)]
                tests = tuple(TestCase(kind="functional", input=a, output=fn(*a), fn_name="solve") for a in args)
                problems.append(Problem(id=f"{prefix}/{name}-{p}-{c}", source="toy", statement=phrasing.format(desc=desc),
                                        tests=tests, reference_solutions=(solution(expr),)))
    return problems


def noisy_demonstrations(problems: list[Problem], noise: float, seed: int = 0) -> list[Problem]:
    """The problems with a `noise` share of their reference solutions replaced by another operation's.

    An imperfect teacher for the warm start: the policy then samples the right
    operation only part of the time, and GRPO+ has something to select.
    """
    rng = random.Random(seed)
    wrong = [solution(expr) for _, _, expr, _ in OPERATIONS]
    return [p.model_copy(update={"reference_solutions": (rng.choice([w for w in wrong if w not in p.reference_solutions]),)})
            if rng.random() < noise else p for p in problems]


def train_problems(copies: int = 4, seed: int = 0) -> list[Problem]:
    return make_problems(TRAIN_PHRASINGS, copies, seed, "toy-train")


def held_out_problems(copies: int = 2, seed: int = 1) -> list[Problem]:
    return make_problems(HELD_OUT_PHRASINGS, copies, seed, "toy-heldout")
