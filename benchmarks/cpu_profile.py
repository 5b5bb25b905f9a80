"""The CPU cost profile: this machine's 2-rank gloo group of tiny models, measured, for the simulator.

`python -m benchmarks.cpu_profile` measures, on two spawned gloo ranks running the
real `ModelRunner`, the step time of packed plans over a grid (CogVideoX and Wan; every
resolution at the trace's frame counts; one request on a 1-rank and on a 2-rank ring,
mixed batches planned by Brick, both models in one step), and the time of the work
outside the step loop (prompt encoding, VAE decode + mp4 of each resolution). It fits

    step = Σ_model (overhead + per_row · rows + per_request_token · Σ request tokens)  # every rank: samplers, CFG
         + max over ranks Σ_model (per_token · M + per_attention · Σ S²/r + per_hop · rows sharded)

(M: tokens the rank holds, S: a row's tokens, r: its ring size) by non-negative least
squares. Then it fits the app's shell on calibration traces of its own, each replayed
through the real app (`real_run`) three times (`--app-runs`; each job's mean latency is
fitted): jobs one at a time give how the app stretches those isolated step costs (one
factor for steps of 1-rank rings, one for steps with a 2-rank ring) and a constant per job
(Ray calls between the replicas, the handoff of the final latents, the mp4); a Poisson
trace at a moderate load gives `per_job_threads`, the CPU that each job in the app takes
outside the steps (progress messages, status polls). The simulator then runs the ranks,
the VAE replica and those per-job threads on two shared cores (processor sharing). The
result goes to `benchmarks/results/cpu_profile.json`, which `CpuProfile` reads. This
machine's speed drifts up to 2x within an hour, so a run is predicted at a slowdown
(`CpuProfile.slowed`: every measured time multiplied) that `fit_slowdown` finds from the
calibration trace replayed beside it (`paper_eval`).
Resolutions are scaled as in the tests (240p-720p rendered 32-96 pixels high), so all
four fit a CPU run; the real app of `cpu_app.real_app_args()` serves the same sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from attention.plan import BrickPlan
from benchmarks.cost_profiles import CostProfile
from benchmarks.cpu_app import MODELS, PLANNER, model_specs, pixel_size
from benchmarks.real_run import run_systems
from benchmarks.simulator import System, capacity, make_engine, mean_latency, new_request
from benchmarks.workloads import FRAMES, RESOLUTIONS, TraceRequest, make_trace
from engine.config import PlannerConfig
from engine.messages import StepPlan
from models import load_adapter

RESULTS = Path(__file__).parent / "results" / "cpu_profile.json"
REAL_MODEL = "wan"
REAL_STEPS = (10, 20)
"""The real CPU app's workload (calibration and evaluation): Wan, with the step mix scaled down with the resolutions
(10/20 instead of 10-80) to keep a run in minutes."""
STEP_GAP_S = 0.007
"""The rank's idle time between two forwards in the app (Ray's actor-call turnaround; `ray_dit_step_gap_seconds`
in benchmarks/engine_step.py), which the grid's in-process steps do not pay."""


# ---- measurement (two spawned gloo ranks) ---------------------------------------------------------------
def _grid() -> list[list[tuple[str, str, int]]]:
    """Steps to time: lists of (family, resolution, ring: 1, 2 or 0 = planned by Brick)."""
    grid = [[(family, res, ring)] for family in MODELS for res in RESOLUTIONS for ring in (1, 2)]
    for family in MODELS:
        grid.append([(family, "240p", 0), (family, "360p", 0)])
        grid.append([(family, res, 0) for res in RESOLUTIONS])
        grid.append([(family, res, 0) for res in RESOLUTIONS for _ in range(2)])
    grid.append([("cogvideox", "480p", 0), ("wan", "360p", 0), ("wan", "720p", 0)])
    return grid


def measure_steps(rank: int, world_size: int, payload: int) -> list[float]:
    """This rank's forward seconds (median of `payload` steps) for every grid entry."""
    from deployments.text_encoder import EncodeRequest, TextEncoderCore
    from engine.config import BudgetConfig
    from engine.engine import EngineCore, LocalExecutor
    from engine.messages import NewRequest
    from engine.policies import make_policy
    from engine.request import GenerationSpec
    from engine.runner import ModelRunner
    from engine.scheduler import StepSchedulerCore

    repeats = payload
    specs = {s.family: s for s in model_specs()}
    executor = LocalExecutor(ModelRunner({s.name: load_adapter(s, ["transformer"]) for s in specs.values()}, rank,
                                         world_size))
    config_only = {s.name: load_adapter(s, ()) for s in specs.values()}
    encoder = TextEncoderCore(list(specs.values()))
    out = []
    for n, entry in enumerate(_grid()):
        ring = {r for _, _, r in entry}.pop() if len({r for _, _, r in entry}) == 1 else 0
        planner = PLANNER if ring == 0 else PlannerConfig(mode="fixed", fixed_degree=ring)
        # The whole grid entry in every step (batching "fill"): each rank runs its own core, and the cost rule would
        # learn from that rank's own timings, so the ranks would plan different steps and their collectives hang.
        engine = EngineCore(StepSchedulerCore(make_policy("fifo"), BudgetConfig(max_batch_size=16),
                                              world_size=world_size, cost_model=planner.cost_model(world_size),
                                              batching="fill"))
        for i, (family, res, _) in enumerate(entry):
            height, width = pixel_size(family, res)
            spec = GenerationSpec(model=specs[family].name, prompt="a calibration scene", negative_prompt="",
                                  height=height, width=width, num_frames=FRAMES[family], num_inference_steps=repeats + 2,
                                  guidance_scale=6.0, seed=i, fps=8)
            prompt = encoder.encode_batch([EncodeRequest(spec.model, spec.prompt, spec.negative_prompt)])[0]
            engine.admit(NewRequest.from_spec(f"g{n}-{i}", spec, prompt, config_only[spec.model]))
        # The first step admits (seeded noise, samplers): not timed.
        times = [engine.run_local(executor)[1].seconds for _ in range(repeats + 1)]
        out.append(statistics.median(times[1:]))
        for request_id in list(engine.scheduler.pool):
            engine.cancel(request_id)
        engine.run_local(executor)  # frees the grid entry's requests on the ranks
    return out


def measure_outside() -> dict:
    """Seconds of prompt encoding and of VAE decode + mp4 per (family, resolution) at the trace's frame counts."""
    import torch

    from deployments.text_encoder import EncodeRequest, TextEncoderCore
    from deployments.vae_decoder import DecodeRequest, VaeDecoderCore

    torch.set_num_threads(1)  # as the encoder and VAE replicas of configs/local.yaml
    specs = model_specs()
    encoder, decoder = TextEncoderCore(specs), VaeDecoderCore(specs)
    out = {"encode": {}, "decode": {}}
    for spec in specs:
        adapter = load_adapter(spec, parts=())
        start = time.perf_counter()
        for _ in range(3):
            encoder.encode_batch([EncodeRequest(spec.name, "a calibration scene", "")])
        out["encode"][spec.family] = (time.perf_counter() - start) / 3
        out["decode"][spec.family] = {}
        for res in RESOLUTIONS:
            latents = torch_randn(adapter.latent_shape(*pixel_size(spec.family, res), FRAMES[spec.family]))
            decoder.decode(DecodeRequest(spec.name, latents.numel(), "mp4"), latents)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                decoder.decode(DecodeRequest(spec.name, latents.numel(), "mp4"), latents)
                times.append(time.perf_counter() - start)
            out["decode"][spec.family][res] = statistics.median(times)
    return out


def torch_randn(shape: tuple[int, ...]):
    import torch

    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))


# ---- the fitted profile -------------------------------------------------------------------------------
_FAMILY_TERMS = ("overhead", "per_row", "per_request_token", "per_token", "per_attention", "per_hop")


def _features(rings: dict[str, BrickPlan], world_size: int, busiest: int) -> np.ndarray:
    """Linear features of one step (per family, the _FAMILY_TERMS), taking rank `busiest` as the slowest."""
    x = np.zeros(len(MODELS) * len(_FAMILY_TERMS))
    for family, brick in rings.items():
        base = list(MODELS).index(family) * len(_FAMILY_TERMS)
        x[base] += 1
        x[base + 1] += len(brick.assignments)
        x[base + 2] += sum(a.tokens for a in brick.assignments)
        for a in brick.assignments:
            if busiest in a.ranks:
                x[base + 3] += a.shard_len(a.ranks.index(busiest))
                x[base + 4] += a.tokens**2 / a.size
                x[base + 5] += a.size > 1
    return x


def _plans() -> list[dict[str, BrickPlan]]:
    """The Brick plans of the grid, as the measuring ranks built them (by family)."""
    profile = CpuProfile(coefficients=np.zeros(len(MODELS) * len(_FAMILY_TERMS)).tolist(), outside={})
    plans = []
    for entry in _grid():
        ring = {r for _, _, r in entry}.pop() if len({r for _, _, r in entry}) == 1 else 0
        planner = PLANNER if ring == 0 else PlannerConfig(mode="fixed", fixed_degree=ring)
        cost = planner.cost_model(2)
        rows: dict[str, list[int]] = {}
        for family, res, _ in entry:
            rows.setdefault(family, []).extend(profile.row_tokens(_request(family, res)))
        from attention.planner import plan_brick

        plans.append({family: plan_brick(tokens, 2, cost) for family, tokens in rows.items()})
    return plans


def fit(step_seconds: list[float]) -> list[float]:
    """Non-negative least squares on the grid; the busiest rank is re-chosen with the fitted terms (3 rounds)."""
    plans = _plans()
    y = np.array(step_seconds)
    busiest = [0] * len(plans)
    coefficients = np.zeros(len(MODELS) * len(_FAMILY_TERMS))
    for _ in range(3):
        x = np.array([_features(p, 2, b) for p, b in zip(plans, busiest)])
        coefficients, _ = nnls(x / y[:, None], np.ones_like(y))  # relative error: small and big steps alike
        busiest = [max(range(2), key=lambda r, p=p: float(_features(p, 2, r) @ coefficients)) for p in plans]
    return coefficients.tolist()


def _request(family: str, resolution: str, steps: int = 10) -> TraceRequest:
    return TraceRequest("calibration", 0.0, family, resolution, FRAMES[family], steps, "", 0)


def sharded(plan: StepPlan) -> bool:
    """The step has a ring of both ranks (the app stretches those steps more)."""
    return any(a.size > 1 for brick in plan.rings.values() for a in brick.assignments)


class CpuProfile(CostProfile):
    """This machine: 2 gloo ranks of tiny models, from `benchmarks/results/cpu_profile.json`."""

    world_size = 2
    planner = PLANNER
    decode_servers = 1  # one VAE replica, decoding one request at a time
    shared_cores = 2

    @property
    def per_job_threads(self) -> float:
        return self.app["per_job_threads"]

    def __init__(self, coefficients: list[float], outside: dict, app: dict | None = None) -> None:
        self.coefficients = np.array(coefficients)
        self.outside = outside
        self.app = app or {"step_scale": 1.0, "ring_step_scale": 1.0, "per_job_s": 0.0, "per_job_threads": 0.0}
        self.slowdown = 1.0
        """How much slower this machine runs now than when the profile was measured: every measured time (steps,
        encode, decode) is multiplied by it. `fit_slowdown` measures it beside the runs it is used for."""
        self._tokens: dict[tuple[str, str, int], int] = {}

    def slowed(self, factor: float) -> CpuProfile:
        """This profile with every measured time `factor` times longer."""
        profile = copy.copy(self)
        profile.slowdown = factor
        return profile

    @classmethod
    def load(cls, path: Path = RESULTS) -> CpuProfile:
        data = json.loads(Path(path).read_text())
        return cls(data["coefficients"], data["outside"], data["app"])

    def row_tokens(self, request: TraceRequest) -> tuple[int, ...]:
        key = (request.model, request.resolution, request.num_frames)
        if key not in self._tokens:
            spec = next(s for s in model_specs() if s.family == request.model)
            geometry = load_adapter(spec, parts=()).geometry
            self._tokens[key] = geometry.seq_len(*pixel_size(request.model, request.resolution), request.num_frames)
        return (self._tokens[key],) * 2

    def step_seconds(self, plan: StepPlan) -> float:
        return self.slowdown * self._step_scale(plan) * self.isolated_step_seconds(plan)

    def _step_scale(self, plan: StepPlan) -> float:
        """In the app a step on a ring of both ranks needs both cores at once, beside the proxy, ingress and
        scheduler threads; a step of 1-rank rings is stretched less. Two factors, fitted on jobs alone."""
        return self.app["ring_step_scale" if sharded(plan) else "step_scale"]

    def isolated_step_seconds(self, plan: StepPlan) -> float:
        return STEP_GAP_S + max(float(_features(plan.rings, 2, rank) @ self.coefficients) for rank in range(2))

    def encode_seconds(self, request: TraceRequest) -> float:
        return self.slowdown * (self.outside["encode"][request.model] + self.app["per_job_s"])

    def decode_seconds(self, request: TraceRequest) -> float:
        return self.slowdown * self.outside["decode"][request.model][request.resolution]


ALONE = [("240p", 10), ("720p", 20), ("360p", 20), ("480p", 10), ("240p", 20), ("720p", 10), ("480p", 20),
         ("360p", 10), ("720p", 20), ("240p", 10), ("720p", 10), ("360p", 20)]
"""(resolution, steps) of the jobs run one at a time through the app to fit its shell."""
CALIBRATION_SYSTEM = {"policy": "srptf", "admission": "step", "planner": {"mode": "brick"}}
CALIBRATION_LOAD = 0.35
"""The Poisson calibration trace's rate as a fraction of the fitted capacity: a moderate load like the ones the
simulator is asked about (the evaluation's real runs are at 0.25 and 0.45), on a trace of its own."""
CALIBRATION_SEED = 5
"""No evaluation trace uses it (they use 7, 11 and 99)."""
CALIBRATION_REQUESTS = 24
SLOWDOWN_RANGE = (0.1, 10.0)
"""Slowdowns `fit_slowdown` searches; one outside it means a broken run, not a slow machine."""


def calibration_rate(profile: CpuProfile) -> float:
    return CALIBRATION_LOAD * capacity(REAL_MODEL, profile, steps=REAL_STEPS)


def calibration_trace(profile: CpuProfile, requests: int = CALIBRATION_REQUESTS) -> list[TraceRequest]:
    """The Poisson calibration trace: `CALIBRATION_LOAD` of `profile`'s capacity, seed `CALIBRATION_SEED`."""
    return make_trace(REAL_MODEL, requests, calibration_rate(profile), seed=CALIBRATION_SEED, steps=REAL_STEPS)


def fit_slowdown(profile: CpuProfile, trace: list[TraceRequest], system: System, real_latency_s: float) -> float:
    """The machine's slowdown during a real run of `trace` on `system` (mean latency `real_latency_s`), relative to
    when `profile` was measured: the factor on every measured time for which the simulator's mean latency of the
    trace equals the real one.

    This machine's speed drifts up to 2x from one half hour to the next (the same trace on the same system,
    measured), so a profile measured at the start of an hour-long evaluation cannot predict its later runs; a
    calibration trace replayed beside them, in the same deployment, gives the speed they ran at. The simulated
    mean grows with the factor, so bisection on its logarithm finds it."""

    def simulated(factor: float) -> float:
        return mean_latency(trace, system, profile.slowed(factor))

    low, high = SLOWDOWN_RANGE
    if not simulated(low) <= real_latency_s <= simulated(high):
        raise RuntimeError(f"{system.name}: no slowdown in {SLOWDOWN_RANGE} gives the real mean latency "
                           f"{real_latency_s:.2f} s of the calibration trace")
    for _ in range(20):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if simulated(middle) < real_latency_s else (low, middle)
    return math.sqrt(low * high)


def fit_app(profile: CpuProfile, repeats: int) -> dict:
    """Fit the app's shell on calibration traces of its own (the evaluation's traces are never fitted on).

    Each trace is replayed `repeats` times in one deployment and each job's latency is its
    mean over the replays (this machine's speed drifts from one replay to the next). First
    jobs alone (Wan, 6 s apart), their decode at its measured time (the app's VAE replica
    decodes as fast as the in-process measurement: one thread either way): latency - decode
    = a·steps·isolated step (1-rank rings) + b·steps·isolated step (2-rank rings) + c, by
    NNLS. Then a Poisson trace at `CALIBRATION_LOAD` of the capacity those give: the per-job
    threads for which the simulator's mean latency of that trace equals the app's. (An
    8-job burst 0.1 s apart, fitted before, is an overload: its term came out 0.05-0.15 in
    three fits and left the simulated latency 37-110% high at load 0.45.)"""
    system = System("calibration", "calibration", CALIBRATION_SYSTEM)
    alone = [TraceRequest(f"alone-{i}", 6.0 * i, "wan", res, FRAMES["wan"], steps, "a calibration scene", i)
             for i, (res, steps) in enumerate(ALONE)]
    latency = _mean_per_job(run_systems({"alone": alone}, [system], repeats)["calibration"]["alone"])
    rows = []
    for request in alone:
        engine = make_engine(system, profile, clock=lambda: 0.0)
        engine.admit(new_request(request, profile))
        plan = engine.schedule()
        steps = request.steps * profile.isolated_step_seconds(plan)
        rows.append([steps, 0.0, 1.0] if not sharded(plan) else [0.0, steps, 1.0])
    y = np.array([latency[i] - profile.decode_seconds(request) for i, request in enumerate(alone)])
    (step_scale, ring_step_scale, per_job), _ = nnls(np.array(rows), y)
    profile.app = {"step_scale": step_scale, "ring_step_scale": ring_step_scale, "per_job_s": per_job,
                   "per_job_threads": 0.0}
    poisson = calibration_trace(profile)
    runs = run_systems({"poisson": poisson}, [system], repeats)["calibration"]["poisson"]
    poisson_latency = statistics.mean(_mean_per_job(runs))

    def poisson_error(threads: float) -> float:
        profile.app["per_job_threads"] = threads
        return abs(mean_latency(poisson, system, profile) - poisson_latency)

    profile.app["per_job_threads"] = min(np.arange(0.0, 1.001, 0.05).tolist(), key=poisson_error)
    return {**profile.app, "alone_latency_s": latency, "poisson_rate": calibration_rate(profile),
            "poisson_latency_s": poisson_latency, "calibration_runs": repeats}


def _mean_per_job(runs: list[list]) -> list[float]:
    """Each job's latency averaged over the replays; a failed calibration job stops the fit (nothing to fit)."""
    failed = [o for run in runs for o in run if o.status != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration jobs did not complete, e.g. {failed[0].status}")
    return [statistics.mean(jobs) for jobs in zip(*([o.latency_s for o in run] for run in runs))]


def measure_profile(out: Path, step_repeats: int = 3, app_runs: int = 3) -> CpuProfile:
    """Measure this machine now (the step grid on two gloo ranks, the work outside the steps, the app's shell),
    write the profile to `out` and return it. This machine's speed drifts from day to day (the grid's steps
    measured 1.3x apart on two days), so `paper_eval` measures it in the same run as the real runs it predicts."""
    from common.spmd import run_spmd

    per_rank = run_spmd(2, measure_steps, step_repeats, timeout_s=900)
    measured = [max(times) for times in zip(*per_rank)]
    coefficients = fit(measured)
    profile = CpuProfile(coefficients, measure_outside())
    predicted = [profile.isolated_step_seconds(StepPlan(0, (), (), (), 0, rings)) - STEP_GAP_S for rings in _plans()]
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    print(f"{len(measured)} grid steps, {min(measured) * 1e3:.1f}-{max(measured) * 1e3:.1f} ms; fit error mean "
          f"{statistics.mean(errors):.1%}, max {max(errors):.1%}")
    profile.app = fit_app(profile, app_runs)
    print("app shell: 1-rank steps x{step_scale:.2f}, 2-rank steps x{ring_step_scale:.2f}, +{per_job_s:.2f} s per "
          "job, {per_job_threads:.2f} threads per job in the app".format(**profile.app))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%d"), "terms": list(_FAMILY_TERMS),
                               "families": list(MODELS), "coefficients": coefficients, "outside": profile.outside,
                               "app": profile.app, "grid_seconds": measured}, indent=1))
    print(f"wrote {out}")
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per grid entry (median)")
    parser.add_argument("--app-runs", type=int, default=3, help="replays of the app's calibration trace (mean per job)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    measure_profile(Path(args.out), args.repeats, args.app_runs)


if __name__ == "__main__":
    main()
