"""Output comparison as competitive-programming judges do it.

stdin tests: lines compared after dropping trailing whitespace and blank lines;
tokens of a line compared exactly, or as numbers within `float_tol` (absolute or
relative) when both parse as floats. Functional tests: return values compared
recursively (lists and tuples alike, dict keys exact, floats within `float_tol`).
"""

from __future__ import annotations

import math
from typing import Any

FLOAT_TOL = 1e-6


def _number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _tokens_match(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def stdout_matches(actual: str, expected: str, tol: float = FLOAT_TOL) -> bool:
    got = [line.split() for line in actual.splitlines() if line.strip()]
    want = [line.split() for line in expected.splitlines() if line.strip()]
    if len(got) != len(want):
        return False
    return all(len(g) == len(w) and all(_tokens_match(a, b, tol) for a, b in zip(g, w)) for g, w in zip(got, want))


def values_match(actual: Any, expected: Any, tol: float = FLOAT_TOL) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected or actual == expected and type(actual) is type(expected)
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(actual, expected, rel_tol=tol, abs_tol=tol)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(values_match(a, e, tol) for a, e in zip(actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(values_match(actual[k], expected[k], tol) for k in expected)
    return actual == expected
