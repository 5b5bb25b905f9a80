"""Curation pipeline of the training set: verify, require tests, deduplicate, decontaminate, filter by difficulty.

    python -m training.curate --source taco:taco.jsonl --source deepcoder:dc.parquet \\
        --eval livecodebench:lcb.jsonl --out data/train.jsonl [--pass-rates rates.json --band 0 1]

Stages, in order (a problem leaves at the first stage it fails, with the reason):
1. `too_few_tests`: fewer than --min-tests tests (default 5);
2. `no_reference` / `reference_failed`: programmatic verification, a reference
   solution must pass all of the problem's tests in the sandbox;
3. `near_duplicate`: MinHash LSH (datasketch) over the statements of all sources,
   Jaccard threshold --dedup-threshold; the first problem seen is kept;
4. `contaminated`: near-duplicate of a problem of the evaluation set(s);
5. `too_easy` / `too_hard` / `unrated`: offline difficulty filter from a reference
   model's pass rates over k samples ({id: rate} or {id: {"passed", "samples"}});
   kept only strictly inside --band (default drops always- and never-solved).
Writes the kept problems as JSONL, a JSON report (per source: loaded, kept, dropped
by reason; every dropped id with its reason) and prints a summary table.
Resumable: verification verdicts are appended to `<out>.verified.jsonl` as they
complete, and a rerun reuses them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from training.loaders import LOADERS, load_problems
from training.problems import Problem, write_jsonl
from training.reward import RewardConfig, score_code

NUM_PERM = 128


@dataclass
class CurationReport:
    loaded: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    reasons: list[dict] = field(default_factory=list)

    def drop(self, problem: Problem, reason: str, detail: str = "") -> None:
        self.dropped[problem.source][reason] += 1
        self.reasons.append({"id": problem.id, "source": problem.source, "reason": reason, "detail": detail})

    def to_json(self) -> dict:
        return {"per_source": {s: {"loaded": self.loaded[s], "kept": self.kept[s], "dropped": dict(self.dropped[s])}
                               for s in sorted(self.loaded)},
                "dropped": self.reasons}

    def table(self) -> str:
        reasons = sorted({r for c in self.dropped.values() for r in c})
        header = ["source", "loaded", "kept", *reasons]
        rows = [[s, str(self.loaded[s]), str(self.kept[s]), *(str(self.dropped[s][r]) for r in reasons)]
                for s in sorted(self.loaded)]
        rows.append(["total", str(sum(self.loaded.values())), str(sum(self.kept.values())),
                     *(str(sum(c[r] for c in self.dropped.values())) for r in reasons)])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: " | ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
        return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def _shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def minhash(text: str) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=1)
    for s in _shingles(text):
        m.update(s.encode())
    return m


def verify(problem: Problem, config: RewardConfig) -> tuple[bool, str]:
    """True if one of the reference solutions passes every test of the problem."""
    if not problem.reference_solutions:
        return False, "no_reference"
    all_tests = RewardConfig(tests_per_problem=len(problem.tests), timeout_s=config.timeout_s,
                             memory_mb=config.memory_mb)
    last = ""
    for solution in problem.reference_solutions[:3]:
        result = score_code(problem, solution, all_tests)
        if result.reward == 1.0:
            return True, "passed"
        last = result.reason
    return False, f"reference_failed:{last}"


def _verify_all(problems: list[Problem], state: Path, workers: int, config: RewardConfig) -> dict[str, str]:
    done = {}
    if state.exists():
        for line in state.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["id"]] = row["verdict"]
    todo = [p for p in problems if p.id not in done]
    with state.open("a") as log, ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(problems), initial=len(problems) - len(todo), desc="verify", unit="problem") as bar:
        futures = {pool.submit(verify, p, config): p for p in todo}
        for future in as_completed(futures):
            ok, verdict = future.result()
            done[futures[future].id] = verdict
            log.write(json.dumps({"id": futures[future].id, "verdict": verdict}) + "\n")
            log.flush()
            bar.update()
    return done


def _pass_rate(value) -> float:
    return value["passed"] / value["samples"] if isinstance(value, dict) else float(value)


def curate(sources: list[tuple[str, Path]], out: Path, eval_sets: list[tuple[str, Path]] = (),
           min_tests: int = 5, dedup_threshold: float = 0.8, pass_rates: dict | None = None,
           band: tuple[float, float] = (0.0, 1.0), drop_unrated: bool = False, workers: int = 2,
           config: RewardConfig = RewardConfig()) -> CurationReport:
    report = CurationReport()
    out.parent.mkdir(parents=True, exist_ok=True)
    problems: list[Problem] = []
    for fmt, path in sources:
        loaded = load_problems(path, fmt)
        for p in loaded:
            report.loaded[p.source] += 1
        problems.extend(loaded)

    candidates = []
    for p in problems:
        if len(p.tests) < min_tests:
            report.drop(p, "too_few_tests", f"{len(p.tests)} < {min_tests}")
        else:
            candidates.append(p)

    verdicts = _verify_all(candidates, out.with_suffix(".verified.jsonl"), workers, config)
    verified = []
    for p in candidates:
        verdict = verdicts[p.id]
        if verdict == "passed":
            verified.append(p)
        else:
            report.drop(p, verdict.split(":")[0], verdict)

    eval_lsh = MinHashLSH(threshold=dedup_threshold, num_perm=NUM_PERM)
    for fmt, path in eval_sets:
        for e in load_problems(path, fmt):
            eval_lsh.insert(e.id, minhash(e.statement))
    seen = MinHashLSH(threshold=dedup_threshold, num_perm=NUM_PERM)
    kept = []
    for p in verified:
        signature = minhash(p.statement)
        if twins := seen.query(signature):
            report.drop(p, "near_duplicate", f"of {sorted(twins)[0]}")
            continue
        seen.insert(p.id, signature)
        if hits := eval_lsh.query(signature):
            report.drop(p, "contaminated", f"matches eval {sorted(hits)[0]}")
            continue
        if pass_rates is not None:
            if p.id not in pass_rates:
                if drop_unrated:
                    report.drop(p, "unrated")
                    continue
            else:
                rate = _pass_rate(pass_rates[p.id])
                if rate >= band[1]:
                    report.drop(p, "too_easy", f"pass rate {rate:.2f}")
                    continue
                if rate <= band[0]:
                    report.drop(p, "too_hard", f"pass rate {rate:.2f}")
                    continue
        kept.append(p)
        report.kept[p.source] += 1
    write_jsonl(kept, out)
    return report


def _format_path(value: str) -> tuple[str, Path]:
    fmt, sep, path = value.partition(":")
    if not sep or fmt not in LOADERS:
        raise argparse.ArgumentTypeError(f"expected FORMAT:PATH with FORMAT in {sorted(LOADERS)}, got {value!r}")
    return fmt, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=_format_path, action="append", required=True, help="FORMAT:PATH")
    parser.add_argument("--eval", type=_format_path, action="append", default=[], help="FORMAT:PATH")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, help="default: <out>.report.json")
    parser.add_argument("--min-tests", type=int, default=5)
    parser.add_argument("--dedup-threshold", type=float, default=0.8)
    parser.add_argument("--pass-rates", type=Path)
    parser.add_argument("--band", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--drop-unrated", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=6.0, help="per-test timeout, 6-12 s")
    args = parser.parse_args(argv)
    rates = json.loads(args.pass_rates.read_text()) if args.pass_rates else None
    report = curate(args.source, args.out, args.eval, args.min_tests, args.dedup_threshold, rates,
                    tuple(args.band), args.drop_unrated, args.workers, RewardConfig(timeout_s=args.timeout))
    report_path = args.report or args.out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report.to_json(), indent=2))
    print(report.table())
    print(f"\nwrote {sum(report.kept.values())} problems to {args.out}, report to {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
