"""Discrete-event simulator: the real `engine/` scheduler, policies, admission modes and Brick planner on a
virtual clock, with a cost profile (`benchmarks.cost_profiles`) in place of the worker group.

Events are arrivals (from a trace) and step ends. The loop reads like the Serve
shell's: admit what has arrived (after its prompt encoding), `schedule()`, advance the
clock by the profile's price of the plan, `postprocess()`. Requests that arrive during
a step join at its end, as in the app. After its last step a request is decoded: at
once, or in FIFO order on the profile's `decode_servers` (the app's VAE replica). Each
request's outcome records arrival, the start of its first step and its finish.

Also: the physical limit of a request (alone, no queueing, on its best ring) and the
stability test used to find the highest load a system sustains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from attention.plan import BrickPlan, RingAssignment, even_bounds
from engine.config import SchedulerConfig
from engine.messages import NewRequest, StepPlan, StepResult
from engine.policies import make_policy
from engine.scheduler import StepSchedulerCore

from benchmarks.cost_profiles import CostProfile
from benchmarks.workloads import TraceRequest

SYSTEMS_DIR = Path(__file__).parent / "systems"
SYSTEMS = ("naive_ring", "naive_batching_ring", "cb_brick_fifo", "cb_brick_srptf", "same_shape_step_sp",
           "request_batch_sp")


@dataclass(frozen=True)
class System:
    name: str
    label: str
    scheduler: dict  # SchedulerConfig fields; the profile supplies the planner's thresholds


def load_system(name: str) -> System:
    data = yaml.safe_load((SYSTEMS_DIR / f"{name}.yaml").read_text())
    return System(name, data["label"], data["scheduler"])


@dataclass(frozen=True)
class Outcome:
    request: TraceRequest
    start_s: float  # the first denoising step begins
    finish_s: float  # the result is ready (after the profile's outside time)

    @property
    def latency_s(self) -> float:
        """Submission to completion, as the client sees it."""
        return self.finish_s - self.request.arrival_s

    @property
    def jct_s(self) -> float:
        """Job completion time on the engine: first step to completion (latency minus queueing)."""
        return self.finish_s - self.start_s


def scheduler_config(system: System, profile: CostProfile) -> SchedulerConfig:
    planner = {**profile.planner.model_dump(), **system.scheduler.get("planner", {})}
    return SchedulerConfig(**{**system.scheduler, "planner": planner, "max_pool_size": 10**6})


def make_core(system: System, profile: CostProfile, clock) -> StepSchedulerCore:
    config = scheduler_config(system, profile)
    return StepSchedulerCore(make_policy(config.policy, config.starvation_timeout_s), config.budget,
                             config.max_pool_size, clock=clock, world_size=profile.world_size,
                             cost_model=config.planner.cost_model(profile.world_size), admission=config.admission,
                             batch_size=config.batch_size)


def new_request(request: TraceRequest, profile: CostProfile) -> NewRequest:
    rows = profile.row_tokens(request)
    return NewRequest(request_id=request.id, model=request.model, latent_shape=(), seq_len=rows[0], row_tokens=rows,
                      seed=request.seed, num_steps=request.steps, guidance_scale=6.0 if len(rows) == 2 else 1.0,
                      prompt=None, cfg=len(rows) == 2)


def simulate(trace: list[TraceRequest], system: System, profile: CostProfile) -> list[Outcome]:
    """Run `trace` through `system` on `profile`'s machine; one outcome per request, in trace order."""
    now = 0.0
    core = make_core(system, profile, clock=lambda: now)
    ready = {r.id: r.arrival_s + profile.encode_seconds(r) for r in trace}  # joins the pool once encoded
    pending = sorted(trace, key=lambda r: ready[r.id])
    by_id = {r.id: r for r in trace}
    start: dict[str, float] = {}
    denoised: dict[str, float] = {}
    i = 0
    while i < len(pending) or core.pool:
        while i < len(pending) and ready[pending[i].id] <= now:
            now_saved, now = now, ready[pending[i].id]  # the request's admission time is its own
            core.admit(new_request(pending[i], profile))
            now = now_saved
            i += 1
        plan = core.schedule()
        if plan is None:
            if i == len(pending):
                raise RuntimeError(f"{len(core.pool)} requests pooled but none schedulable under {system.name}")
            now = max(now, ready[pending[i].id])  # idle until the next arrival
            continue
        for step in plan.scheduled:
            start.setdefault(step.request_id, now)
        now += profile.step_seconds(plan)
        core.postprocess(plan, StepResult.all_stepped(plan))
        for meta in core.pop_done():
            denoised[meta.request_id] = now
    finish = _decode(denoised, by_id, profile)
    return [Outcome(r, start[r.id], finish[r.id]) for r in trace]


def _decode(denoised: dict[str, float], by_id: dict[str, TraceRequest], profile: CostProfile) -> dict[str, float]:
    """Finish times: each request decoded after its last step, on `decode_servers` FIFO servers if set."""
    if profile.decode_servers is None:
        return {i: t + profile.decode_seconds(by_id[i]) for i, t in denoised.items()}
    free = [0.0] * profile.decode_servers
    finish = {}
    for request_id, t in sorted(denoised.items(), key=lambda item: item[1]):
        server = min(range(len(free)), key=free.__getitem__)
        free[server] = max(t, free[server]) + profile.decode_seconds(by_id[request_id])
        finish[request_id] = free[server]
    return finish


def physical_limit_s(request: TraceRequest, profile: CostProfile) -> float:
    """The request alone, no queueing, at its fastest step: every ring size, its forward rows (CFG) on one ring or
    on disjoint rings side by side; steps x that step, plus the time outside the step loop."""
    rows = profile.row_tokens(request)
    best = float("inf")
    for ring in (r for r in profile.planner.ring_sizes if r <= profile.world_size):
        layouts = [[tuple(range(ring))] * len(rows)]
        if ring * len(rows) <= profile.world_size:
            layouts.append([tuple(range(i * ring, (i + 1) * ring)) for i in range(len(rows))])
        for rings in layouts:
            brick = BrickPlan(profile.world_size, tuple(RingAssignment(i, ranks, even_bounds(n, ring))
                                                        for i, (n, ranks) in enumerate(zip(rows, rings))))
            best = min(best, profile.step_seconds(StepPlan(0, (), (), (), sum(rows), {request.model: brick})))
    return request.steps * best + profile.encode_seconds(request) + profile.decode_seconds(request)


def is_stable(outcomes: list[Outcome]) -> bool:
    """A system keeps up with a trace when, at the last arrival, at most a tenth of the trace is still in it
    (admitted or waiting, not finished). Past saturation the backlog grows with every arrival: n·(1 - 1/ρ) at load ρ."""
    last_arrival = max(o.request.arrival_s for o in outcomes)
    backlog = sum(1 for o in outcomes if o.finish_s > last_arrival)
    return backlog <= len(outcomes) / 10
