"""The whole job through the real HTTP app, as a user runs it: the shipped scheduler against naive serving.

The video application of `configs/local.yaml` as shipped (2 gloo ranks, the tiny
models at their real 240p / 360p sizes), with only its `scheduler` section changed
per system:

- `naive`: each job runs alone to its last step, FCFS (policy fifo, admission request);
- `fixed_batch_8`: step-level batching that fills a batch of 8 in SRPTF order (batching
  fill: the first DiT-Serve design, and vLLM-Omni's step mode without the shape rule);
- `default`: the shipped section (SRPTF, cost-model batching, decode in policy order).

A Poisson trace of `cogvideox-tiny` jobs (resolution uniform over 240p / 360p, steps
uniform over 10 / 20 / 40 / 80, the model's default 9 frames) is POSTed at its arrival
offsets; latency is the server's `completed_at` minus the client's submission time.
The systems take turns, one deployment each per round (the machine's speed drifts over
half an hour; turns share it fairly), `rounds` rounds. Printed per system: mean and p95
latency over each run, the mean over runs with its 95% interval (t distribution), the
mean seconds per stage (`stages` of the job), each run's throughput (completed jobs over the
span from the first arrival to the last completion), and each system's mean over naive's.
At a rate no system keeps up with, the throughput is the system's capacity: the issue's
"0.8 of Naive's capacity" is 0.8 x naive's throughput under `--rate 100`.

    python -m benchmarks.end_to_end                         # the issue's trace: 24 jobs at 0.15/s, 5 rounds
    python -m benchmarks.end_to_end --rate 0.2 --rounds 3   # another load
    python -m benchmarks.end_to_end --json out.json         # every job of every run
    python -m benchmarks.end_to_end --systems naive --rate 100 --rounds 2   # naive's capacity (jobs/s)
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import math
import statistics
from pathlib import Path

from ray import serve

from api.serve_configs import serve_application
from benchmarks.app_profile import AppProfile, MeasuredApp
from benchmarks.real_run import RealOutcome, run_systems
from benchmarks.simulator import System, simulate
from benchmarks.workloads import TraceRequest, make_trace

SYSTEMS = (
    System("naive", "Naive (FCFS, run to completion)", {"policy": "fifo", "admission": "request"}),
    System("fixed_batch_8", "CB + SRPTF, fixed batch 8", {"policy": "srptf", "batching": "fill",
                                                          "budget": {"max_batch_size": 8}}),
    System("default", "Shipped default (CB + SRPTF, cost-model batching)", {}),
)
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
"""Two-sided 95% Student t quantiles by degrees of freedom."""


def local_video_args(scheduler: dict) -> dict:
    """configs/local.yaml's video application args with `scheduler` merged over its scheduler section."""
    args = copy.deepcopy(serve_application("video")["args"])
    merged = {**args["scheduler"], **scheduler}
    if "budget" in scheduler:
        merged["budget"] = {**args["scheduler"].get("budget", {}), **scheduler["budget"]}
    args["scheduler"] = merged
    return args


def app_measurements(system: System) -> dict:
    """What the deployment still up measured: the scheduler's step-cost model and the decoder's rate."""
    stats = serve.get_deployment_handle("StepScheduler", app_name="video").stats.remote().result()
    decoder = serve.get_deployment_handle("VaeDecoder", app_name="video").load.remote().result()
    return {"step_cost": stats["step_cost"], "decode_seconds_per_element": decoder["seconds_per_element"]}


def measured_app(measurements: list[dict], runs: list[list[RealOutcome]]) -> MeasuredApp:
    """The default deployments' measurements averaged over rounds, with the jobs' mean encode seconds."""
    models = {m for entry in measurements for m, c in entry["step_cost"].items() if c is not None}
    step_cost = {m: tuple(statistics.mean(e["step_cost"][m][i] for e in measurements if e["step_cost"].get(m))
                          for i in (0, 1)) for m in models}
    decode = statistics.mean(e["decode_seconds_per_element"] for e in measurements)
    encode = [o.job["stages"]["encode_s"] for run in runs for o in run if o.job.get("stages")]
    return MeasuredApp(step_cost, decode, statistics.mean(encode))


def simulated_means(trace: list[TraceRequest], measured: MeasuredApp) -> dict[str, float]:
    """Each system's mean latency on the trace in the simulator, priced by what the real app measured."""
    profile = AppProfile(local_video_args({}), measured, {"cogvideox": "cogvideox-tiny"})
    means = {}
    for system in SYSTEMS:
        full = System(system.name, system.label, local_video_args(system.scheduler)["scheduler"])
        means[system.name] = statistics.mean(o.latency_s for o in simulate(trace, full, profile))
    return means


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T_95[min(len(values) - 1, 10)] * statistics.stdev(values) / math.sqrt(len(values))


SERVICE_STAGES = ("encode_s", "denoise_s", "decode_s", "mux_s")
"""A job's own work in its `stages`: everything but the time it waited (queue_s, decode_queue_s)."""


def single_server_means(jobs: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean latency of `(arrival_s, service_s)` jobs on one work-conserving server, first-come-first-served and
    under preemptive shortest-remaining-processing-time (SRPT: provably the least mean latency of any order when
    sizes are known and a job may be preempted at any instant).

    The ratio of the two is what ordering alone can gain on this trace: the ceiling of an SRPT-style scheduler
    on a device one job already saturates (where batching adds no throughput) when every stage of the job,
    the VAE decode included, could be preempted, which the app's decode cannot."""
    ordered = sorted(jobs)
    free, fcfs = 0.0, []
    for arrival, service in ordered:
        free = max(free, arrival) + service
        fcfs.append(free - arrival)
    now, index, srpt = 0.0, 0, []
    pending: list[list[float]] = []  # heap of [remaining_s, arrival_s]
    while index < len(ordered) or pending:
        if not pending:
            now = max(now, ordered[index][0])
        while index < len(ordered) and ordered[index][0] <= now:
            heapq.heappush(pending, [ordered[index][1], ordered[index][0]])
            index += 1
        remaining, arrival = pending[0]
        next_arrival = ordered[index][0] if index < len(ordered) else math.inf
        if now + remaining <= next_arrival:
            now += remaining
            heapq.heappop(pending)
            srpt.append(now - arrival)
        else:
            pending[0][0] -= next_arrival - now
            now = next_arrival
    return statistics.mean(fcfs), statistics.mean(srpt)


def ordering_bound(runs: list[list[RealOutcome]]) -> tuple[float, float, float]:
    """Per run, each completed job's arrival and own work (`SERVICE_STAGES` as the app measured them) on one
    server, FCFS and ideal SRPT: the mean FCFS and SRPT latencies over runs and the mean of the runs' ratios."""
    pairs = []
    for run in runs:
        jobs = [(o.request.arrival_s, sum(o.job["stages"][k] for k in SERVICE_STAGES))
                for o in run if o.status == "completed" and o.job.get("stages")]
        if jobs:
            pairs.append(single_server_means(jobs))
    return (statistics.mean(f for f, _ in pairs), statistics.mean(s for _, s in pairs),
            statistics.mean(f / s for f, s in pairs))


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def throughput(run: list[RealOutcome]) -> float:
    """Completed jobs per second from the first arrival to the last completion (the client's clock)."""
    done = [o for o in run if o.status == "completed"]
    span = max(o.request.arrival_s + o.latency_s for o in done) - min(o.request.arrival_s for o in run)
    return len(done) / span


def summarise(runs: dict[str, list[list[RealOutcome]]]) -> dict:
    """Per system: each run's mean and p95, the mean over runs with its interval, the stage means."""
    out = {}
    for name, system_runs in runs.items():
        latencies = [[o.latency_s for o in run if o.status == "completed"] for run in system_runs]
        failed = sum(1 for run in system_runs for o in run if o.status != "completed")
        means = [statistics.mean(run) for run in latencies if run]
        mean, half = interval(means)
        stages: dict[str, list[float]] = {}
        for run in system_runs:
            for outcome in run:
                for stage, seconds in (outcome.job.get("stages") or {}).items():
                    stages.setdefault(stage, []).append(seconds)
        out[name] = {"run_means_s": means, "run_p95_s": [p95(run) for run in latencies if run], "mean_s": mean,
                     "ci95_s": half, "p95_mean_s": statistics.mean(p95(run) for run in latencies if run),
                     "failed": failed, "throughput_jobs_per_s": statistics.mean(map(throughput, system_runs)),
                     "stages_mean_s": {k: statistics.mean(v) for k, v in stages.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--rate", type=float, default=0.15, help="jobs per second (Poisson)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of the trace per system, systems in turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", nargs="+", default=[s.name for s in SYSTEMS],
                        choices=[s.name for s in SYSTEMS])
    parser.add_argument("--json", type=Path, default=None, help="write every job of every run here")
    args = parser.parse_args()
    trace = make_trace("cogvideox", args.jobs, args.rate, seed=args.seed, resolutions=("240p", "360p"),
                       num_frames=9)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    runs: dict[str, list[list[RealOutcome]]] = {s.name: [] for s in systems}
    measurements: list[dict] = []  # each default deployment's, before it is deleted
    for round_index in range(args.rounds):
        for system in systems:
            deployment = run_systems({"trace": trace}, [system], app_args=local_video_args,
                                     before_delete=lambda s: measurements.append(app_measurements(s))
                                     if s.name == "default" else None)
            runs[system.name].extend(deployment[system.name]["trace"])
            last = runs[system.name][-1]
            done = [o.latency_s for o in last if o.status == "completed"]
            print(f"round {round_index + 1} {system.name}: mean {statistics.mean(done):.2f} s, p95 {p95(done):.2f} s, "
                  f"throughput {throughput(last):.4f} jobs/s, {len(last) - len(done)} failed", flush=True)
    summary = summarise(runs)
    print(f"\n{args.jobs} cogvideox-tiny jobs, Poisson {args.rate}/s, 240p/360p, steps 10-80; {args.rounds} runs each")
    naive = summary.get("naive")
    for system in systems:
        row = summary[system.name]
        ratio = f"; naive / this {naive['mean_s'] / row['mean_s']:.2f}x" if naive else ""
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in row["stages_mean_s"].items())
        print(f"{system.label:52s} mean {row['mean_s']:6.2f} s ± {row['ci95_s']:.2f} (95%), p95 "
              f"{row['p95_mean_s']:6.2f} s, throughput {row['throughput_jobs_per_s']:.4f} jobs/s, "
              f"failed {row['failed']}{ratio}\n    runs {[round(m, 2) for m in row['run_means_s']]}"
              f"\n    stages (mean s): {stages}")
    for system in systems:
        fcfs, srpt, ratio = ordering_bound(runs[system.name])
        print(f"\nordering bound on {system.name}'s measured job sizes (one server, every stage preemptible): FCFS "
              f"{fcfs:.2f} s, ideal SRPT {srpt:.2f} s, FCFS / SRPT {ratio:.2f}x")
        summary[system.name]["ordering_bound"] = {"fcfs_s": fcfs, "srpt_s": srpt, "ratio": ratio}
    if measurements:
        measured = measured_app(measurements, runs["default"])
        simulated = simulated_means(trace, measured)
        real_order = sorted((s.name for s in systems), key=lambda n: summary[n]["mean_s"])
        simulated_order = sorted((s.name for s in systems), key=simulated.__getitem__)
        print(f"\nsimulator on the app's own measurements (step cost {measured.step_cost}, decode "
              f"{measured.decode_seconds_per_element:.3g} s per latent element, encode {measured.encode_s:.3f} s):")
        for system in systems:
            print(f"  {system.name:14s} simulated {simulated[system.name]:6.2f} s, real {summary[system.name]['mean_s']:6.2f} s")
        print(f"  order real {real_order}, simulated {simulated_order}: "
              f"{'the same' if real_order == simulated_order else 'DIFFERENT'}")
        summary["simulated_mean_s"] = simulated
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "summary": summary,
                                         "jobs": {name: [[{"request": o.request.__dict__, "latency_s": o.latency_s,
                                                           "status": o.status, "job": o.job} for o in run]
                                                          for run in system_runs]
                                                  for name, system_runs in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
