"""DiT-Serve's evaluation (thesis section 3.3, Figures 3.2 and 3.3) reproduced on this engine's simulator.

Every system of `benchmarks/systems/` (Naive + Ring, Naive batching + Ring, CB + Brick
+ FIFO, CB + Brick + SRPTF, and the two fixed-degree baselines users run today) is a
configuration of the same `engine/` scheduler and planner, driven by
`benchmarks.simulator` over the same seeded traces (`benchmarks.workloads`) on the
8 x H100 profile (`benchmarks.cost_profiles.H100Profile`, real model sizes). For each
model it sweeps the arrival rate λ (Poisson) as fractions of the model's capacity
(ranks / mean single-rank service time) and, at every λ, the burstiness (Gamma
arrivals, CV 1-8), and writes:

- `eval_latency.png`, `eval_jct.png`: mean latency (submission -> completion) and mean
  JCT (first step -> completion) vs λ per model, one line per system, the physical limit
  (each request alone on its best ring) dashed;
- `eval_burstiness.png`: mean latency vs CV at the reference λ (the highest λ where
  Naive + Ring is stable, found on the grid, then bisected between the grid's last
  stable and first unstable λ);
- `evaluation.md`: the tables, every system's latency as a multiple of the physical
  limit, the ratios of CB + Brick + SRPTF against the baselines, the CV smoothness, and
  the real CPU app against the simulator on the CPU profile (same traces, several runs
  per system and load, each after a run of a calibration trace that gives the machine's
  speed at that time; the full sweep first measures that profile and rewrites
  `benchmarks/results/cpu_profile.json`, `--quick` reads the stored one).

    python -m benchmarks.paper_eval            # docs/img/*.png, docs/evaluation.md (~55 minutes)
    python -m benchmarks.paper_eval --quick    # fewer requests and rates (< 3 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.cost_profiles import CostProfile, H100Profile  # noqa: E402
from benchmarks.cpu_profile import (  # noqa: E402
    REAL_MODEL,
    REAL_STEPS,
    RESULTS,
    CpuProfile,
    calibration_trace,
    fit_slowdown,
    measure_profile,
)
from benchmarks.simulator import SYSTEMS, capacity, is_stable, load_system, mean_latency, physical_limit_s, simulate  # noqa: E402
from benchmarks.workloads import FRAMES, TraceRequest, make_trace  # noqa: E402
from common.paths import PROJECT_ROOT  # noqa: E402

OURS, NAIVE, SAME_SHAPE, REQUEST_SP = "cb_brick_srptf", "naive_ring", "same_shape_step_sp", "request_batch_sp"


@dataclass(frozen=True)
class Sweep:
    requests: int
    load_fractions: tuple[float, ...]
    cvs: tuple[float, ...]
    real_requests: int  # per real run on the CPU app
    real_loads: dict[float, tuple[str, ...]]  # load fraction -> systems run for real at it
    real_replays: int  # replays of the trace, each after one of the calibration trace, in one deployment per system
    measure_profile: bool  # measure the CPU profile in this run (else the stored one) before the real runs
    bisections: int  # halvings of the gap between Naive + Ring's highest stable and lowest unstable grid λ


CALIBRATION_SYSTEMS = ("naive_ring", "cb_brick_fifo", "cb_brick_srptf")
FULL = Sweep(400, (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2, 1.5), (1, 2, 4, 8), 24,
             {0.25: CALIBRATION_SYSTEMS, 0.45: SYSTEMS}, real_replays=4, measure_profile=True, bisections=4)
QUICK = Sweep(80, (0.15, 0.3, 0.6), (1, 4), 8, {0.4: (OURS,)}, real_replays=1, measure_profile=False, bisections=2)


@dataclass(frozen=True)
class RealPoint:
    fraction: float
    rate: float
    system: str
    run_latencies_s: tuple[float, ...]  # the mean latency of each real run of the trace
    calibration_latencies_s: tuple[float, ...]  # the same of the calibration trace's runs, each just before one
    slowdown: float  # the machine's slowdown during the runs, fitted on the calibration runs (`fit_slowdown`)
    simulated_latency_s: float  # the trace on the profile at that slowdown
    runs_slowdown: float  # the slowdown at which the simulator gives the real runs' mean (a diagnostic, never used)
    failed: int  # jobs of either trace that did not complete

    @property
    def real_latency_s(self) -> float:
        """The mean over the runs: one run of ~30 s on this shared machine is up to ~2x off the next one."""
        return statistics.mean(self.run_latencies_s)

    @property
    def error(self) -> float:
        return abs(self.simulated_latency_s - self.real_latency_s) / self.real_latency_s

    @property
    def speed_error(self) -> float:
        """How far the calibration's slowdown is from the one the runs needed: the simulator's error in speed
        terms. Near saturation latency grows 2-4x faster than the slowdown, so a small speed error is a large
        latency one."""
        return self.slowdown / self.runs_slowdown - 1

    @property
    def spread(self) -> float:
        """(slowest run - fastest run) / their mean: how far apart the real runs themselves are."""
        return (max(self.run_latencies_s) - min(self.run_latencies_s)) / self.real_latency_s


def real_vs_simulated(sweep: Sweep) -> list[RealPoint]:
    """Each load's trace through the real app (CPU, 2 ranks) and through the simulator on the calibrated CPU profile
    (measured in this run for the full sweep: loads are fractions of the machine's capacity today).

    Each system's deployment replays the calibration trace and the load's trace in turns; the calibration runs
    give the machine's slowdown during that deployment (`fit_slowdown`), and the simulator predicts the load's
    trace at it. The calibration trace is never the evaluated one (its own seed, its own load)."""
    from benchmarks.real_run import run_systems

    profile = measure_profile(RESULTS) if sweep.measure_profile else CpuProfile.load()
    cap = capacity(REAL_MODEL, profile, steps=REAL_STEPS)
    calibration = calibration_trace(profile, sweep.real_requests)
    points = []
    for fraction, systems in sweep.real_loads.items():
        rate = fraction * cap
        trace = evaluated_trace(sweep, rate)
        real = run_systems({"calibration": calibration, "evaluation": trace}, [load_system(s) for s in systems],
                           sweep.real_replays)
        for name in systems:
            runs, system = real[name], load_system(name)
            calibration_means = _run_means(runs["calibration"])
            slowdown = fit_slowdown(profile, calibration, system, statistics.mean(calibration_means))
            simulated = mean_latency(trace, system, profile.slowed(slowdown))
            evaluation_means = _run_means(runs["evaluation"])
            runs_slowdown = fit_slowdown(profile, trace, system, statistics.mean(evaluation_means))
            failed = sum(o.status != "completed" for name_runs in runs.values() for run in name_runs for o in run)
            points.append(RealPoint(fraction, rate, name, evaluation_means, calibration_means, slowdown, simulated,
                                    runs_slowdown, failed))
    return points


def evaluated_trace(sweep: Sweep, rate: float) -> list[TraceRequest]:
    """The real runs' trace at `rate` (seed 11: not the calibration's)."""
    return make_trace(REAL_MODEL, sweep.real_requests, rate, seed=11, steps=REAL_STEPS)


def _run_means(runs: list[list]) -> tuple[float, ...]:
    """Each run's mean latency over its completed jobs."""
    done = [[o.latency_s for o in run if o.status == "completed"] for run in runs]
    return tuple(statistics.mean(latencies) if latencies else float("nan") for latencies in done)


@dataclass(frozen=True)
class Point:
    model: str
    rate: float
    cv: float
    system: str
    latency_s: float
    jct_s: float
    limit_s: float
    stable: bool


def run_point(model: str, rate: float, cv: float, sweep: Sweep, profile: CostProfile,
              systems: tuple[str, ...]) -> list[Point]:
    trace = make_trace(model, sweep.requests, rate, cv, seed=7)
    limit = statistics.mean(physical_limit_s(r, profile) for r in trace)
    points = []
    for name in systems:
        outcomes = simulate(trace, load_system(name), profile)
        points.append(Point(model, rate, cv, name, statistics.mean(o.latency_s for o in outcomes),
                            statistics.mean(o.jct_s for o in outcomes), limit, is_stable(outcomes)))
    return points


def naive_ring_stable(model: str, rate: float, requests: int, profile: CostProfile) -> bool:
    """Whether Naive + Ring keeps up with the evaluation's Poisson trace (seed 7) at `rate`."""
    return is_stable(simulate(make_trace(model, requests, rate, 1.0, seed=7), load_system(NAIVE), profile))


def stability_edge(model: str, stable_rate: float, unstable_rate: float, sweep: Sweep,
                   profile: CostProfile) -> float:
    """The highest λ where Naive + Ring is stable, to within (unstable - stable) / 2^bisections: the grid alone
    places it up to a whole grid step low, and the baselines' latency climbs steeply in that step."""
    for _ in range(sweep.bisections):
        middle = round((stable_rate + unstable_rate) / 2, 5)
        if naive_ring_stable(model, middle, sweep.requests, profile):
            stable_rate = middle
        else:
            unstable_rate = middle
    return stable_rate


def evaluate(sweep: Sweep, profile: CostProfile) -> tuple[list[Point], dict[str, float], dict[str, float]]:
    """Every model x λ x CV x system; returns the points, each model's reference λ (Naive + Ring's stability edge)
    and the highest grid λ where Naive + Ring is stable."""
    points, reference, grid_reference = [], {}, {}
    for model in FRAMES:
        cap = capacity(model, profile)
        rates = [round(f * cap, 5) for f in sweep.load_fractions]
        for rate in rates:
            points += run_point(model, rate, 1.0, sweep, profile, SYSTEMS)
        stable = [p.rate for p in points if p.model == model and p.system == NAIVE and p.cv == 1 and p.stable]
        grid_reference[model] = reference[model] = max(stable, default=rates[0])
        unstable = [rate for rate in rates if rate > reference[model] and rate not in stable]
        if unstable and stable:
            reference[model] = stability_edge(model, reference[model], min(unstable), sweep, profile)
            if reference[model] not in rates:
                points += run_point(model, reference[model], 1.0, sweep, profile, SYSTEMS)
                rates = sorted(rates + [reference[model]])
        for rate in rates:
            for cv in sweep.cvs:
                if cv != 1:
                    systems = SYSTEMS if rate == reference[model] else (OURS,)
                    points += run_point(model, rate, cv, sweep, profile, systems)
    return points, reference, grid_reference


def _get(points: list[Point], **match) -> list[Point]:
    return [p for p in points if all(getattr(p, k) == v for k, v in match.items())]


def plot(points: list[Point], reference: dict[str, float], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    labels = {name: load_system(name).label for name in SYSTEMS}
    paths = []
    for metric, filename, title in (("latency_s", "eval_latency.png", "mean latency (s)"),
                                    ("jct_s", "eval_jct.png", "mean JCT (s)")):
        fig, axes = plt.subplots(1, len(FRAMES), figsize=(5 * len(FRAMES), 4))
        for ax, model in zip(axes, FRAMES):
            for name in SYSTEMS:
                series = sorted(_get(points, model=model, system=name, cv=1), key=lambda p: p.rate)
                ax.plot([p.rate for p in series], [getattr(p, metric) for p in series], marker="o", label=labels[name])
            limit = sorted(_get(points, model=model, system=OURS, cv=1), key=lambda p: p.rate)
            ax.plot([p.rate for p in limit], [p.limit_s for p in limit], "k--", label="physical limit")
            ax.set(title=f"{model} (8 x H100, simulated)", xlabel="arrival rate λ (requests/s)", ylabel=title,
                   yscale="log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(FRAMES), figsize=(5 * len(FRAMES), 4))
    for ax, model in zip(axes, FRAMES):
        for name in SYSTEMS:
            series = sorted(_get(points, model=model, system=name, rate=reference[model]), key=lambda p: p.cv)
            ax.plot([p.cv for p in series], [p.latency_s for p in series], marker="o", label=labels[name])
        ax.set(title=f"{model} at λ = {reference[model]:.4g}/s", xlabel="arrival CV (Gamma)",
               ylabel="mean latency (s)", xscale="log", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "eval_burstiness.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def ratios(points: list[Point], reference: dict[str, float]) -> dict[str, dict[str, float]]:
    """At each model's reference λ (CV 1): the baselines' mean latency over CB + Brick + SRPTF's."""
    out = {}
    for model, rate in reference.items():
        ours = _get(points, model=model, rate=rate, cv=1, system=OURS)[0].latency_s
        out[model] = {name: _get(points, model=model, rate=rate, cv=1, system=name)[0].latency_s / ours
                      for name in SYSTEMS if name != OURS}
    return out


def cv_growth(points: list[Point]) -> dict[tuple[str, float], float]:
    """CB + Brick + SRPTF at every λ: the largest latency ratio between consecutive CVs (a cliff shows as a jump)."""
    out = {}
    for model in FRAMES:
        for rate in sorted({p.rate for p in _get(points, model=model, system=OURS)}):
            series = sorted(_get(points, model=model, system=OURS, rate=rate), key=lambda p: p.cv)
            out[(model, rate)] = max(b.latency_s / a.latency_s for a, b in zip(series, series[1:]))
    return out


def real_report(real: list[RealPoint], sweep: Sweep) -> list[str]:
    labels = {name: load_system(name).label for name in SYSTEMS}
    lines = ["", f"## The real CPU app vs the simulator (CPU profile), {REAL_MODEL}", "",
             "The same trace through the Serve app over HTTP (2 gloo ranks, tiny models, 240p-720p scaled to 32-96 px, "
             f"steps {'/'.join(map(str, REAL_STEPS))}) and through the simulator with the CPU profile "
             f"(`benchmarks.cpu_profile`, {'measured in this run' if sweep.measure_profile else 'the stored one'}). "
             f"Each system was deployed once per load and ran the calibration trace (seed 5, its own load) and the "
             f"load's trace in turns, {sweep.real_replays} time(s) each. The calibration runs give the machine's "
             "slowdown during that deployment, relative to when the profile was measured (the factor on every "
             "measured time for which the simulated mean latency of the calibration trace is the real one); the "
             "simulated column is the load's trace at that slowdown. The error is the simulator's against the mean "
             "of the load's runs, the spread is (slowest run - fastest run) / mean. The last columns diagnose the "
             "error (never used to predict): the slowdown at which the simulator would give the load's runs, and "
             "the calibration's slowdown against it (the simulator's error in speed terms).", "",
             "| load (of capacity) | λ | system | calibration trace, real (each run) | slowdown | real mean latency "
             "| each run | spread | simulated | error | failed | the runs' slowdown | speed error |",
             "| --- " * 13 + "|"]
    for p in real:
        lines.append(f"| {p.fraction} | {p.rate:.3g} | {labels[p.system]} | "
                     f"{statistics.mean(p.calibration_latencies_s):.2f} s ("
                     + " / ".join(f"{run:.2f}" for run in p.calibration_latencies_s) + f") | {p.slowdown:.2f}x | "
                     f"{p.real_latency_s:.2f} s | " + " / ".join(f"{run:.2f}" for run in p.run_latencies_s)
                     + f" | {p.spread:.0%} | {p.simulated_latency_s:.2f} s | {p.error:.0%} | {p.failed} | "
                     f"{p.runs_slowdown:.2f}x | {p.speed_error:+.0%} |")
    for fraction in sorted({p.fraction for p in real}):
        at = {p.system: p for p in real if p.fraction == fraction}
        if NAIVE in at and OURS in at:
            lines += ["", f"At load {fraction}: Naive + Ring / CB + Brick + SRPTF mean latency = "
                      f"{at[NAIVE].real_latency_s / at[OURS].real_latency_s:.2f}x real, "
                      f"{at[NAIVE].simulated_latency_s / at[OURS].simulated_latency_s:.2f}x simulated; "
                      "real order (fastest first): " + ", ".join(labels[p.system] for p in
                                                                sorted(at.values(), key=lambda p: p.real_latency_s))]
    return lines


def _ratio_rows(points: list[Point], reference: dict[str, float]) -> list[str]:
    return [f"| {model} | {reference[model]:.4g} | " + " | ".join(f"{row[s]:.2f}x" for s in row) + " |"
            for model, row in ratios(points, reference).items()]


def write_report(points: list[Point], reference: dict[str, float], grid_reference: dict[str, float],
                 images: list[Path], path: Path, sweep: Sweep, seconds: float, real: list[RealPoint]) -> str:
    labels = {name: load_system(name).label for name in SYSTEMS}
    lines = ["# Evaluation: DiT-Serve's comparison reproduced on this engine", "",
             "Generated by `python -m benchmarks.paper_eval` "
             f"({sweep.requests} requests per trace, {seconds:.0f} s); do not edit by hand. Method, cost model and "
             "what differs from the paper: `docs/evaluation_method.md`.", ""]
    lines += [f"![{img.stem}](img/{img.name})" for img in images] + [""]
    for model in FRAMES:
        lines += [f"## {model}: mean latency (s) and multiple of the physical limit, CV 1", "",
                  "| λ (req/s) | " + " | ".join(labels[s] for s in SYSTEMS) + " | physical limit |",
                  "| --- " * (len(SYSTEMS) + 2) + "|"]
        for rate in sorted({p.rate for p in _get(points, model=model, cv=1)}):
            row = {p.system: p for p in _get(points, model=model, rate=rate, cv=1)}
            cells = [f"{row[s].latency_s:.1f} ({row[s].latency_s / row[s].limit_s:.1f}x){'' if row[s].stable else ' †'}"
                     for s in SYSTEMS]
            lines.append(f"| {rate:.4g}{' (ref)' if rate == reference[model] else ''} | " + " | ".join(cells)
                         + f" | {row[OURS].limit_s:.1f} |")
        lines += ["", "† unstable: more than a tenth of the trace still in the system at its last arrival.", ""]
    header = ["| model | λ | " + " | ".join(labels[s] for s in SYSTEMS if s != OURS) + " |",
              "| --- " * (len(SYSTEMS) + 1) + "|"]
    lines += ["## Ratios at the reference λ (highest λ where Naive + Ring is stable), CV 1", "",
              f"Baseline mean latency / CB + Brick + SRPTF mean latency. The reference λ is bisected {sweep.bisections} "
              "times between the grid's last stable and first unstable λ of Naive + Ring.", ""]
    lines += header + _ratio_rows(points, reference)
    lines += ["", "The same ratios at the highest *grid* λ where Naive + Ring is stable (up to one grid step below "
              "its edge):", ""] + header + _ratio_rows(points, grid_reference)
    lines += ["", "## Burstiness: CB + Brick + SRPTF, mean latency (s) by arrival CV, and the largest ratio between "
              "consecutive CVs", "",
              "| model | λ | " + " | ".join(f"CV {c}" for c in sweep.cvs) + " | largest step |",
              "| --- " * (len(sweep.cvs) + 3) + "|"]
    for (model, rate), growth in cv_growth(points).items():
        series = sorted(_get(points, model=model, system=OURS, rate=rate), key=lambda p: p.cv)
        lines.append(f"| {model} | {rate:.4g} | " + " | ".join(f"{p.latency_s:.1f}" for p in series)
                     + f" | {growth:.2f}x |")
    if real:
        lines += real_report(real, sweep)
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, rates and CVs (< 3 minutes)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs"), help="writes img/*.png and evaluation.md here")
    parser.add_argument("--no-real", action="store_true", help="simulate only (no runs of the CPU app)")
    args = parser.parse_args()
    sweep = QUICK if args.quick else FULL
    start = time.perf_counter()
    real = [] if args.no_real else real_vs_simulated(sweep)
    for p in real:
        print(f"calibration: {p.system} at load {p.fraction} (λ={p.rate:.3g}/s): real {p.real_latency_s:.2f} s "
              f"(mean of {len(p.run_latencies_s)} runs, spread {p.spread:.0%}), "
              f"simulated {p.simulated_latency_s:.2f} s at slowdown {p.slowdown:.2f}, error {p.error:.1%} "
              f"(the runs' slowdown {p.runs_slowdown:.2f}: speed error {p.speed_error:+.1%})")
    points, reference, grid_reference = evaluate(sweep, H100Profile())
    out = Path(args.out)
    images = plot(points, reference, out / "img")
    write_report(points, reference, grid_reference, images, out / "evaluation.md", sweep,
                 time.perf_counter() - start, real)
    for model, row in ratios(points, reference).items():
        print(f"{model} at λ={reference[model]:.4g}/s (highest stable for Naive + Ring): CB + Brick + SRPTF is "
              + ", ".join(f"{row[s]:.2f}x lower than {load_system(s).label}" for s in row))
    growth = cv_growth(points)
    print(f"largest latency step between consecutive CVs (CB + Brick + SRPTF, any λ): {max(growth.values()):.2f}x")
    print(f"wrote {', '.join(str(p) for p in images)} and {out / 'evaluation.md'} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
