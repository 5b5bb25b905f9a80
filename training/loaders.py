"""Loaders from the formats people have on disk to `Problem` (no hub access).

Rows come from local JSONL or parquet files (`read_rows`). Formats:
- `taco` / `apps`: `question`, `solutions` (JSON list), `starter_code`, and
  `input_output` = JSON {"inputs": [...], "outputs": [...], "fn_name"?}; with
  fn_name the tests are functional (inputs are argument lists).
- `livecodebench`: `question_content`, `starter_code`, `public_test_cases` (JSON list
  of {input, output, testtype}), `private_test_cases` (base64 of zlib of JSON; LCB's
  own files hold a pickle there, which is refused: untrusted bytes are never
  unpickled), `metadata` (JSON with `func_name` for functional problems), and an
  optional `solutions` list (LCB ships none; verification needs them).
- `synthetic1` (PrimeIntellect SYNTHETIC-1): `prompt`, `gold_standard_solution`,
  `verification_info` = JSON {"test_cases": [{"type": "stdin_stdout"|"function_call",
  "input", "output", "fn_name"?}]}.
- `deepcoder` (agentica DeepCoder rows): `problem`, `solutions`?, `tests` (JSON list of
  {input, output, testtype} or a TACO-style {"inputs", "outputs", "fn_name"?}),
  `metadata` {"func_name"?}.
Functional inputs given as text hold one JSON argument per line (LiveCodeBench's
convention); outputs given as text are parsed as JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from training.problems import Problem, TestCase


class FormatError(ValueError):
    """A row that does not follow its declared format; the message names the row and field."""


def read_rows(path: Path) -> Iterator[dict]:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with path.open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _json(value: Any, field: str, row_id: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{row_id}: field {field!r} is not valid JSON ({exc.msg})") from exc


def _args(value: Any) -> list:
    """Functional-test arguments: a JSON list, or text with one JSON value per line."""
    if isinstance(value, list):
        return value
    return [json.loads(line) for line in str(value).splitlines() if line.strip()]


def _expected(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _case(kind: str, inp: Any, out: Any, fn_name: str | None) -> TestCase:
    if kind == "functional":
        return TestCase(kind="functional", input=_args(inp), output=_expected(out), fn_name=fn_name)
    return TestCase(kind="stdin", input=str(inp), output=str(out))


def _io_tests(io: dict, row_id: str) -> list[TestCase]:
    inputs, outputs, fn = io.get("inputs"), io.get("outputs"), io.get("fn_name")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise FormatError(f"{row_id}: input_output needs equal-length 'inputs' and 'outputs' lists")
    if fn:
        # TACO stores functional outputs as one-element lists of the return value.
        return [TestCase(kind="functional", input=_args(i), fn_name=fn,
                         output=o[0] if isinstance(o, list) and len(o) == 1 else o) for i, o in zip(inputs, outputs)]
    return [_case("stdin", "\n".join(i) if isinstance(i, list) else i, "\n".join(o) if isinstance(o, list) else o,
                  None) for i, o in zip(inputs, outputs)]


def load_taco(row: dict, index: int, source: str = "taco") -> Problem:
    row_id = str(row.get("id", row.get("problem_id", f"{source}-{index}")))
    io = _json(row.get("input_output"), "input_output", row_id) or {}
    solutions = _json(row.get("solutions") or "[]", "solutions", row_id)
    return Problem(id=f"{source}/{row_id}", source=source, statement=row["question"],
                   starter_code=row.get("starter_code") or "", tests=tuple(_io_tests(io, row_id)),
                   reference_solutions=tuple(solutions),
                   metadata={k: row[k] for k in ("difficulty", "url") if row.get(k)})


def decode_private_tests(blob: str, row_id: str) -> list:
    """LiveCodeBench private tests: base64 -> zlib -> JSON only."""
    try:
        raw = zlib.decompress(base64.b64decode(blob, validate=True))
    except (binascii.Error, zlib.error) as exc:
        raise FormatError(f"{row_id}: private_test_cases is not base64 of zlib data ({exc})") from exc
    if raw[:1] == b"\x80":
        raise FormatError(f"{row_id}: private_test_cases holds a pickle; untrusted bytes are never unpickled. "
                          "Convert the file to JSON test cases first.")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{row_id}: private_test_cases does not decode to JSON ({exc})") from exc


def load_livecodebench(row: dict, index: int) -> Problem:
    row_id = str(row.get("question_id", f"lcb-{index}"))
    metadata = _json(row.get("metadata") or "{}", "metadata", row_id)
    fn = metadata.get("func_name")
    cases = list(_json(row.get("public_test_cases") or "[]", "public_test_cases", row_id))
    if row.get("private_test_cases"):
        cases += decode_private_tests(row["private_test_cases"], row_id)
    tests = [_case("functional" if c.get("testtype") == "functional" else "stdin", c["input"], c["output"], fn)
             for c in cases]
    return Problem(id=f"livecodebench/{row_id}", source="livecodebench", statement=row["question_content"],
                   starter_code=row.get("starter_code") or "", tests=tuple(tests),
                   reference_solutions=tuple(_json(row.get("solutions") or "[]", "solutions", row_id)),
                   metadata={k: row[k] for k in ("difficulty", "contest_date", "platform") if row.get(k)})


def load_synthetic1(row: dict, index: int) -> Problem:
    row_id = str(row.get("problem_id", f"synthetic1-{index}"))
    info = _json(row["verification_info"], "verification_info", row_id)
    tests = [_case("functional" if c.get("type") == "function_call" else "stdin", c["input"], c["output"],
                   c.get("fn_name")) for c in info.get("test_cases", [])]
    solutions = (row["gold_standard_solution"],) if row.get("gold_standard_solution") else ()
    return Problem(id=f"synthetic1/{row_id}", source=row.get("source") or "synthetic1", statement=row["prompt"],
                   tests=tuple(tests), reference_solutions=_strip_fences(solutions))


def load_deepcoder(row: dict, index: int) -> Problem:
    row_id = str(row.get("id", f"deepcoder-{index}"))
    metadata = _json(row.get("metadata") or "{}", "metadata", row_id)
    tests_field = _json(row["tests"], "tests", row_id)
    if isinstance(tests_field, dict):
        tests = _io_tests({**tests_field, "fn_name": tests_field.get("fn_name") or metadata.get("func_name")}, row_id)
    else:
        fn = metadata.get("func_name")
        tests = [_case("functional" if c.get("testtype") == "functional" or c.get("type") == "function_call"
                       else "stdin", c["input"], c["output"], fn) for c in tests_field]
    solutions = _json(row.get("solutions") or "[]", "solutions", row_id)
    return Problem(id=f"deepcoder/{row_id}", source="deepcoder", statement=row["problem"], tests=tuple(tests),
                   reference_solutions=tuple(solutions), metadata=metadata)


def _strip_fences(solutions: tuple[str, ...]) -> tuple[str, ...]:
    from training.reward import extract_code

    return tuple(extract_code(s) or s for s in solutions)


LOADERS: dict[str, Callable[[dict, int], Problem]] = {
    "taco": load_taco,
    "apps": lambda row, i: load_taco(row, i, source="apps"),
    "livecodebench": load_livecodebench,
    "synthetic1": load_synthetic1,
    "deepcoder": load_deepcoder,
}


def load_problems(path: Path, fmt: str) -> list[Problem]:
    """Every row of a JSONL/parquet file in format `fmt` as a `Problem`."""
    if fmt not in LOADERS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(LOADERS)}")
    problems = []
    for i, row in enumerate(read_rows(path)):
        try:
            problems.append(LOADERS[fmt](row, i))
        except KeyError as exc:
            raise FormatError(f"{path}: row {i} ({fmt}) lacks field {exc}") from exc
    return problems
