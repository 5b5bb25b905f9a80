"""Loaders for each format, judge rules, curation pipeline (dedup, filters, resume) and the pass@k evaluator."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

import httpx
import pytest

from training import curate as curate_module
from training.curate import curate
from training.evaluate import OpenAIBackend, SampleBackend, evaluate, pass_at_k
from training.judge import stdout_matches, values_match
from training.loaders import FormatError, decode_private_tests, load_problems
from training.problems import read_jsonl
from training.reward import extract_code, select_tests

FIXTURES = Path(__file__).resolve().parents[1] / "training" / "fixtures"


def test_each_format_loads_into_problems():
    taco = {p.id: p for p in load_problems(FIXTURES / "taco.jsonl", "taco")}
    fn = taco["taco/max-subarray"].tests[0]
    assert fn.kind == "functional" and fn.fn_name == "max_subarray" and isinstance(fn.input[0], list)
    assert isinstance(fn.output, int)  # TACO's one-element output list unwrapped
    assert taco["taco/sum-two"].tests[0].kind == "stdin" and taco["taco/sum-two"].reference_solutions

    lcb = {p.id: p for p in load_problems(FIXTURES / "livecodebench.jsonl", "livecodebench")}
    pal = lcb["livecodebench/lcb-palindrome"]
    assert len(pal.tests) == 7  # 3 public + 4 private (base64 + zlib + JSON)
    assert pal.tests[0].fn_name == "isPalindrome" and isinstance(pal.tests[0].output, bool)

    syn = {p.id: p for p in load_problems(FIXTURES / "synthetic1.jsonl", "synthetic1")}
    assert syn["synthetic1/syn-gcd"].tests[0].kind == "functional"
    assert not syn["synthetic1/syn-fib"].reference_solutions[0].startswith("```")  # fences stripped

    dc = {p.id: p for p in load_problems(FIXTURES / "deepcoder.jsonl", "deepcoder")}
    assert dc["deepcoder/dc-digits"].tests[0].fn_name == "digit_sum"
    assert dc["deepcoder/dc-sorted"].tests[0].kind == "stdin"


def test_parquet_rows_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "taco.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "taco.parquet")
    assert load_problems(tmp_path / "taco.parquet", "taco") == load_problems(FIXTURES / "taco.jsonl", "taco")


def test_pickled_private_tests_are_refused_never_unpickled():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    with pytest.raises(FormatError, match="never unpickled"):
        decode_private_tests(blob, "row-1")
    with pytest.raises(FormatError, match="not base64"):
        decode_private_tests("%%%", "row-2")
    ok = base64.b64encode(zlib.compress(json.dumps([{"input": "1", "output": "1"}]).encode())).decode()
    assert decode_private_tests(ok, "row-3") == [{"input": "1", "output": "1"}]


def test_bad_rows_name_the_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "input_output": "{not json"}) + "\n")
    with pytest.raises(FormatError, match="x: field 'input_output' is not valid JSON"):
        load_problems(bad, "taco")
    bad.write_text(json.dumps({"problem_id": "y"}) + "\n")
    with pytest.raises(FormatError, match="row 0 \\(synthetic1\\) lacks field 'verification_info'"):
        load_problems(bad, "synthetic1")


def test_judge_rules():
    assert stdout_matches("1 2  3 \n\n4\n", "1 2 3\n4")
    assert stdout_matches("0.3333333\n", "0.33333333333")
    assert not stdout_matches("0.34\n", "0.33")
    assert not stdout_matches("1 2\n", "1 2 3\n")
    assert not stdout_matches("a\nb\n", "ab\n")
    assert values_match((1, [2.0000000001]), [1, [2]]) and values_match({"a": 1}, {"a": 1.0})
    assert not values_match(True, 1) and not values_match([1, 2], [1, 2, 3])


def test_code_extraction_and_test_selection():
    text = "first\n```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("no code here") is None
    problems = load_problems(FIXTURES / "taco.jsonl", "taco")
    tests = problems[0].tests
    chosen = select_tests(tests, 3)
    assert len(chosen) == 3 and min(t.size for t in chosen) >= max(t.size for t in tests if t not in chosen)


SOURCES = [("taco", FIXTURES / "taco.jsonl"), ("synthetic1", FIXTURES / "synthetic1.jsonl"),
           ("deepcoder", FIXTURES / "deepcoder.jsonl"), ("livecodebench", FIXTURES / "livecodebench.jsonl")]


def test_curation_drops_each_problem_for_its_reason_and_resumes(tmp_path, monkeypatch):
    rates = {"taco/reverse-words": 1.0, "taco/max-subarray": 0.0, "synthetic1/syn-fib": {"passed": 3, "samples": 8}}
    out = tmp_path / "train.jsonl"
    report = curate(SOURCES, out, eval_sets=[("deepcoder", FIXTURES / "deepcoder.jsonl")], pass_rates=rates)
    reasons = {r["id"]: r["reason"] for r in report.reasons}
    assert reasons == {
        "taco/echo-few-tests": "too_few_tests",
        "taco/square-wrong-ref": "reference_failed",
        "synthetic1/syn-sum-dup": "near_duplicate",
        "deepcoder/dc-sorted": "contaminated", "deepcoder/dc-digits": "contaminated",
        "taco/reverse-words": "too_easy", "taco/max-subarray": "too_hard",
    }
    kept = {p.id for p in read_jsonl(out)}
    assert kept == {"taco/sum-two", "synthetic1/syn-fib", "synthetic1/syn-gcd", "livecodebench/lcb-max",
                    "livecodebench/lcb-palindrome"}
    assert report.to_json()["per_source"]["taco"] == {"loaded": 5, "kept": 1, "dropped": {
        "too_few_tests": 1, "reference_failed": 1, "too_easy": 1, "too_hard": 1}}
    assert "total" in report.table()

    # A rerun reuses the recorded verification verdicts: nothing is executed again.
    monkeypatch.setattr(curate_module, "verify", lambda *a: pytest.fail("re-verified a recorded problem"))
    again = curate(SOURCES, out, eval_sets=[("deepcoder", FIXTURES / "deepcoder.jsonl")], pass_rates=rates)
    assert {r["id"] for r in again.reasons} == set(reasons)


def test_curation_cli_writes_training_set_and_report(tmp_path, capsys):
    out = tmp_path / "cli" / "train.jsonl"
    args = ["--source", f"taco:{FIXTURES / 'taco.jsonl'}", "--out", str(out), "--min-tests", "5"]
    assert curate_module.main(args) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["per_source"]["taco"]["kept"] == 3
    assert "wrote 3 problems" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        curate_module.main(["--source", "nope:x.jsonl", "--out", str(out)])


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


class ScriptedBackend(SampleBackend):
    """Returns each problem's reference solution for the first `good` samples and junk after."""

    def __init__(self, problems, good: int) -> None:
        self.by_prompt_start = {p.statement.strip()[:40]: p for p in problems}
        self.good = good

    def sample(self, prompts, n):
        out = []
        for prompt in prompts:
            p = self.by_prompt_start[prompt[:40]]
            out.append([f"```python\n{p.reference_solutions[0]}\n```" if i < self.good else "no idea"
                        for i in range(n)])
        return out


def test_evaluator_reports_pass_at_k():
    problems = [p for p in load_problems(FIXTURES / "deepcoder.jsonl", "deepcoder")]
    report = evaluate(problems, ScriptedBackend(problems, good=1), samples=4, ks=[1, 2])
    assert report["pass@1"] == pytest.approx(0.25) and report["pass@2"] == pytest.approx(0.5)
    assert all(row["correct"] == 1 and row["reasons"] == {"passed": 1, "format": 3} for row in report["per_problem"])


def test_openai_backend_sends_deepcoder_sampling_and_reads_choices():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": f"answer {i}"}}
                   for i in range(body["n"])]
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                         "choices": choices})

    backend = OpenAIBackend("http://coder.test/v1", "tiny-coder", None, 0.6, 0.95,
                            http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert backend.sample(["p1", "p2"], 3) == [["answer 0", "answer 1", "answer 2"]] * 2
    assert seen[0]["temperature"] == 0.6 and seen[0]["top_p"] == 0.95 and seen[0]["n"] == 3
    assert seen[0]["messages"] == [{"role": "user", "content": "p1"}]
