"""The evaluation harness: traces, the simulator over the real engine, and `paper_eval --quick` end to end."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.cost_profiles import CostProfile, H100Profile
from benchmarks.cpu_profile import REAL_MODEL, REAL_STEPS, CpuProfile, calibration_trace
from benchmarks.paper_eval import OURS, QUICK, evaluated_trace, naive_ring_stable, stability_edge
from benchmarks.simulator import SYSTEMS, capacity, is_stable, load_system, mean_latency, physical_limit_s, simulate
from benchmarks.workloads import FRAMES, TraceRequest, arrival_times, make_trace, read_jsonl, write_jsonl
from common.paths import PROJECT_ROOT
from engine.config import PlannerConfig


def test_traces_are_seeded_round_trip_through_jsonl_and_follow_the_mix(tmp_path):
    trace = make_trace("wan", 400, rate=0.5, cv=1.0, seed=3)
    assert trace == make_trace("wan", 400, rate=0.5, cv=1.0, seed=3) != make_trace("wan", 400, rate=0.5, seed=4)
    write_jsonl(trace, tmp_path / "t.jsonl")
    assert read_jsonl(tmp_path / "t.jsonl") == trace
    assert {r.num_frames for r in trace} == {FRAMES["wan"]}
    assert {r.resolution for r in trace} == {"240p", "360p", "480p", "720p"}
    assert {r.steps for r in trace} == {10, 20, 40, 80}


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_arrivals_have_the_asked_rate_and_burstiness(cv):
    gaps = np.diff(arrival_times(200_000, rate=2.0, cv=cv, rng=np.random.default_rng(0)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_every_system_finishes_every_request_no_faster_than_its_physical_limit():
    profile = H100Profile()
    trace = make_trace("cogvideox", 40, rate=0.05, seed=1)
    limits = {r.id: physical_limit_s(r, profile) for r in trace}
    for name in SYSTEMS:
        outcomes = simulate(trace, load_system(name), profile)
        assert [o.request.id for o in outcomes] == [r.id for r in trace]
        for o in outcomes:
            assert o.request.arrival_s <= o.start_s < o.finish_s
            assert o.latency_s >= limits[o.request.id] * (1 - 1e-9), (name, o)


def test_under_overload_srptf_beats_run_to_completion_and_the_naive_queue_grows():
    profile = H100Profile()
    trace = make_trace("cogvideox", 150, rate=0.15, seed=2)
    naive = simulate(trace, load_system("naive_ring"), profile)
    ours = simulate(trace, load_system("cb_brick_srptf"), profile)
    mean = lambda outcomes: sum(o.latency_s for o in outcomes) / len(outcomes)  # noqa: E731
    assert mean(ours) < mean(naive) / 2
    assert not is_stable(naive) and is_stable(ours)
    light = make_trace("cogvideox", 150, rate=0.005, seed=2)
    assert is_stable(simulate(light, load_system("naive_ring"), profile))


def test_the_reference_rate_is_naive_rings_stability_edge_to_the_bisection_resolution():
    profile, sweep = H100Profile(), dataclasses.replace(QUICK, requests=120, bisections=3)
    cap = capacity("cogvideox", profile)
    stable_at = lambda rate: naive_ring_stable("cogvideox", rate, 120, profile)  # noqa: E731
    low, high = round(0.6 * cap, 5), round(1.6 * cap, 5)
    assert stable_at(low) and not stable_at(high)
    edge = stability_edge("cogvideox", low, high, sweep, profile)
    assert low < edge < high and stable_at(edge)
    assert not stable_at(round(edge + (high - low) / 2**3, 5))  # the bisection's last unstable point


def test_paper_eval_quick_writes_plots_and_a_report_with_ratios_from_the_same_run(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.paper_eval", "--quick", "--out", str(tmp_path)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540)  # ~2.5 min alone
    assert run.returncode == 0, run.stderr
    for name in ("eval_latency.png", "eval_jct.png", "eval_burstiness.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "evaluation.md").read_text()
    printed = {m: float(x) for m, x in re.findall(r"^(\w+) at λ=.*?is ([0-9.]+)x lower than Naive \+ Ring", run.stdout,
                                                  re.M)}
    assert set(printed) == set(FRAMES)
    for model, ratio in printed.items():  # the printed ratio is the report's, recomputed from its table
        row = re.search(rf"^\| {model} \| [0-9.e-]+ \| ([0-9.]+)x", report, re.M)
        assert row and float(row.group(1)) == pytest.approx(ratio, abs=0.006)
        assert ratio > 1
    printed = re.findall(r"^calibration: cb_brick_srptf at load 0.4 .*: real ([0-9.]+) s \(mean of 1 runs, "
                         r"spread 0%\), simulated ([0-9.]+) s at slowdown ([0-9.]+), error ([0-9.]+)% "
                         r"\(the runs' slowdown ([0-9.]+): speed error ([-+0-9.]+)%\)$", run.stdout, re.M)
    assert len(printed) == 1, run.stdout  # the real app's run against the simulator, its error printed
    real, simulated, slowdown, error, runs_slowdown, speed_error = map(float, printed[0])
    assert real > 0 and simulated > 0 and 0.1 < slowdown < 10
    assert error == pytest.approx(100 * abs(simulated - real) / real, abs=1.0)  # from the rounded latencies
    assert speed_error == pytest.approx(100 * (slowdown / runs_slowdown - 1), abs=1.0)
    row = re.search(r"^\| 0.4 \| [0-9.]+ \| CB \+ Brick \+ SRPTF \| ([0-9.]+) s \(([0-9.]+)\) \| ([0-9.]+)x \| "
                    r"([0-9.]+) s \| ([0-9.]+) \| 0% \| ([0-9.]+) s \| ([0-9]+)% \| 0 \| ([0-9.]+)x \| [-+0-9]+% \|$",
                    report, re.M)
    assert row, report  # the report's calibration row is the printed one
    calibration_real, calibration_run, *latencies = (float(x) for x in row.groups()[:6])
    assert calibration_run == calibration_real
    assert latencies == pytest.approx([slowdown, real, real, simulated], abs=0.006)
    assert float(row.group(7)) == pytest.approx(error, abs=0.6)
    assert float(row.group(8)) == pytest.approx(runs_slowdown, abs=0.006)
    stored = CpuProfile.load()  # each slowdown makes the simulator reproduce the runs it was fitted on
    for trace, latency, factor in ((calibration_trace(stored, QUICK.real_requests), calibration_real, slowdown),
                                   (evaluated_trace(QUICK, 0.4 * capacity(REAL_MODEL, stored, steps=REAL_STEPS)),
                                    real, runs_slowdown)):
        assert mean_latency(trace, load_system(OURS), stored.slowed(factor)) == pytest.approx(latency, rel=0.05)


class _OneCoreProfile(CostProfile):
    """1 rank, 1 s per step, 1 s per decode on one VAE server; `shared_cores` as given."""

    world_size = 1
    planner = PlannerConfig(ring_sizes=(1,))
    decode_servers = 1

    def __init__(self, shared_cores):
        self.shared_cores = shared_cores

    def row_tokens(self, request):
        return (100,)

    def step_seconds(self, plan):
        return 1.0

    def decode_seconds(self, request):
        return 1.0


def test_on_shared_cores_a_step_and_a_decode_slow_each_other_down():
    trace = [TraceRequest(f"r{i}", float(i), "wan", "240p", 49, 1, "", i) for i in range(2)]
    system = load_system("cb_brick_fifo")
    dedicated = {o.request.id: o.finish_s for o in simulate(trace, system, _OneCoreProfile(None))}
    assert dedicated == pytest.approx({"r0": 2.0, "r1": 3.0})  # r1's step runs beside r0's decode
    shared = {o.request.id: o.finish_s for o in simulate(trace, system, _OneCoreProfile(1))}
    assert shared == pytest.approx({"r0": 3.0, "r1": 4.0})  # both at half speed on one core, then r1's decode alone
