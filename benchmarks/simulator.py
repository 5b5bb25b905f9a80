"""Discrete-event simulator: the real engine (`engine.engine.EngineCore`: scheduler, policies, admission modes,
Brick planner, step-cost model) on a virtual clock, with a cost profile (`benchmarks.cost_profiles`) as its
executor in place of the worker group.

Events are arrivals (from a trace) and step ends. The loop is the Serve shell's: the
start-up probe seeds the engine's step-cost model (the trace's smallest and largest
request of each model, alone and together), then admit what has arrived (after its
prompt encoding), `schedule()`, advance the clock by the profile's price of the plan
(`VirtualClockExecutor`), `complete()` with the step's elapsed time. Requests that
arrive during a step join at its end, as in the app. After its last step a request is
decoded: at once, or on the profile's `decode_servers` (the app's VAE replica) in the
policy's decode order (`SchedulingPolicy.decode_priority`, as the VaeDecoder orders its
queue). Each request's outcome records arrival, the start of its first step and its finish.

Also: the physical limit of a request (alone, no queueing, on its best ring) and the
stability test used to find the highest load a system sustains.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from attention.plan import BrickPlan, RingAssignment, even_bounds
from benchmarks.cost_profiles import CostProfile
from benchmarks.workloads import STEP_CHOICES, TraceRequest, make_trace
from engine.config import SchedulerConfig
from engine.engine import EngineCore, Executed
from engine.messages import NewRequest, StepPlan, StepResult

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


def make_engine(system: System, profile: CostProfile, clock) -> EngineCore:
    return EngineCore.from_config(scheduler_config(system, profile), world_size=profile.world_size, clock=clock)


class VirtualClockExecutor:
    """The engine's executor on a cost profile's machine: every scheduled request steps, in the profile's price of
    the plan at full speed (the simulation stretches it where the step shares cores with decodes)."""

    def __init__(self, profile: CostProfile) -> None:
        self.profile = profile

    def run(self, plan: StepPlan) -> Executed:
        return Executed(StepResult.all_stepped(plan), (self.profile.step_seconds(plan),))


def probe(engine: EngineCore, trace: list[TraceRequest], profile: CostProfile) -> None:
    """The Serve shell's start-up probe on the profile's machine: the smallest and largest request of each model
    in the trace, one step alone and together, priced by the profile; the fit becomes the cost model's prior."""
    by_model: dict[str, list[TraceRequest]] = {}
    for request in trace:
        by_model.setdefault(request.model, []).append(request)
    ends = []
    for requests in by_model.values():
        sized = sorted(requests, key=lambda r: sum(profile.row_tokens(r)))
        ends.extend({id(r): r for r in (sized[0], sized[-1])}.values())
    executor = VirtualClockExecutor(profile)
    engine.seed_cost_model((plan, executor.run(plan).seconds)
                           for plan in engine.scheduler.probe_plans([new_request(r, profile) for r in ends]))


def new_request(request: TraceRequest, profile: CostProfile) -> NewRequest:
    rows = profile.row_tokens(request)
    return NewRequest(request_id=request.id, model=request.model, latent_shape=(), seq_len=rows[0], row_tokens=rows,
                      seed=request.seed, num_steps=request.steps, guidance_scale=6.0 if len(rows) == 2 else 1.0,
                      prompt=None, cfg=len(rows) == 2)


def simulate(trace: list[TraceRequest], system: System, profile: CostProfile) -> list[Outcome]:
    """Run `trace` through `system` on `profile`'s machine; one outcome per request, in trace order."""
    return _Simulation(trace, system, profile).run()


def mean_latency(trace: list[TraceRequest], system: System, profile: CostProfile) -> float:
    """The simulated mean latency of `trace` on `system`: what the calibrations match against the real app's."""
    return statistics.mean(o.latency_s for o in simulate(trace, system, profile))


@dataclass
class _Step:
    plan: StepPlan
    executed: Executed  # at full speed; its time is replaced by the elapsed one when the step ends
    work_left_s: float  # seconds of the step still to run at full speed
    ranks: int  # busy threads while it runs
    started_s: float


class _Simulation:
    """The event loop. Work in flight (the current step, the decodes) progresses at rate 1, or, where the ranks and
    the decode servers share `profile.shared_cores` cores, at cores / busy threads when more threads than cores are
    busy (processor sharing: a step of both ranks beside a decode runs at 2/3 speed on 2 cores, and so does the
    decode)."""

    def __init__(self, trace: list[TraceRequest], system: System, profile: CostProfile) -> None:
        self.now = 0.0
        self.profile = profile
        self.engine = make_engine(system, profile, clock=lambda: self.now)
        self.executor = VirtualClockExecutor(profile)
        probe(self.engine, trace, profile)
        self.system = system
        self.by_id = {r.id: r for r in trace}
        self.ready = {r.id: r.arrival_s + profile.encode_seconds(r) for r in trace}  # joins the pool once encoded
        self.pending = sorted(trace, key=lambda r: self.ready[r.id])
        self.next_arrival = 0
        self.step: _Step | None = None
        self.decode_queue: list[tuple[tuple, str]] = []  # (the policy's decode priority, request id)
        self.decoding: dict[str, float] = {}  # request id -> remaining seconds of decode work
        self.start: dict[str, float] = {}
        self.finish: dict[str, float] = {}

    def run(self) -> list[Outcome]:
        trace = list(self.by_id.values())
        while len(self.finish) < len(trace):
            self._admit_arrived()
            if self.step is None:
                self._start_step()
            self._advance()
        return [Outcome(r, self.start[r.id], self.finish[r.id]) for r in trace]

    def _admit_arrived(self) -> None:
        while self.next_arrival < len(self.pending) and self.ready[self.pending[self.next_arrival].id] <= self.now:
            request = self.pending[self.next_arrival]
            now, self.now = self.now, self.ready[request.id]  # the request's admission time is its own
            self.engine.admit(new_request(request, self.profile))
            self.now = now
            self.next_arrival += 1

    def _start_step(self) -> None:
        scheduler = self.engine.scheduler
        scheduler.set_busy_ranks(len(self.decoding) * self.profile.decode_displaces_ranks)
        plan = self.engine.schedule()
        if plan is None:
            if scheduler.pool and self.next_arrival == len(self.pending) and not self.decoding:
                raise RuntimeError(f"{len(scheduler.pool)} requests pooled but none schedulable under "
                                   f"{self.system.name}")
            return
        for step in plan.scheduled:
            self.start.setdefault(step.request_id, self.now)
        ranks = {rank for brick in plan.rings.values() for a in brick.assignments for rank in a.ranks}
        executed = self.executor.run(plan)
        self.step = _Step(plan, executed, executed.seconds, len(ranks), self.now)

    def _rate(self) -> float:
        cores = self.profile.shared_cores
        if cores is None:
            return 1.0
        in_system = sum(1 for r in self.pending if r.arrival_s <= self.now) - len(self.finish)
        busy = (self.step.ranks if self.step else 0) + len(self.decoding) + self.profile.per_job_threads * in_system
        return 1.0 if busy <= cores else cores / busy

    def _advance(self) -> None:
        """Move the clock to the next event: the step's end, a decode's end or (idle) the next arrival."""
        rate = self._rate()
        ends = [left / rate for left in self.decoding.values()]
        if self.step:
            ends.append(self.step.work_left_s / rate)
        elif self.next_arrival < len(self.pending):
            ends.append(self.ready[self.pending[self.next_arrival].id] - self.now)
        dt = max(0.0, min(ends))
        self.now += dt
        for request_id in list(self.decoding):
            self.decoding[request_id] -= dt * rate
            if self.decoding[request_id] <= 1e-12:
                del self.decoding[request_id]
                self.finish[request_id] = self.now
        if self.step:
            self.step.work_left_s -= dt * rate
            if self.step.work_left_s <= 1e-12:
                step, self.step = self.step, None
                elapsed = Executed(step.executed.result, (self.now - step.started_s,))
                for end in self.engine.complete(step.plan, elapsed):
                    decode_s = self.profile.decode_seconds(self.by_id[end.meta.request_id])
                    priority = self.engine.scheduler.policy.decode_priority(end.meta.arrival_time, decode_s)
                    heapq.heappush(self.decode_queue, (priority, end.meta.request_id))
        servers = self.profile.decode_servers
        while self.decode_queue and (servers is None or len(self.decoding) < servers):
            _, request_id = heapq.heappop(self.decode_queue)
            self.decoding[request_id] = self.profile.decode_seconds(self.by_id[request_id])


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


def capacity(model: str, profile: CostProfile, n: int = 200, steps: tuple[int, ...] = STEP_CHOICES) -> float:
    """Requests/s the machine could finish: ranks / mean single-rank service time if every request ran on one rank
    with no rank idle, or the decode servers' rate if that is lower; where ranks and decoding share the cores (the
    CPU machine), cores / mean (service + decode) seconds of one request."""
    trace = make_trace(model, n, rate=1.0, seed=99, steps=steps)
    one_rank = System("one-rank", "", {"policy": "fifo", "admission": "request", "planner": {"mode": "fixed",
                                                                                          "fixed_degree": 1}})
    service = []
    for request in trace:
        engine = make_engine(one_rank, profile, clock=lambda: 0.0)
        engine.admit(new_request(request, profile))
        service.append(request.steps * profile.step_seconds(engine.schedule()))
    decode = statistics.mean(profile.decode_seconds(r) for r in trace)
    if profile.shared_cores is not None:
        return profile.shared_cores / (statistics.mean(service) + decode)
    engine = profile.world_size / statistics.mean(service)
    if profile.decode_servers is None:
        return engine
    return min(engine, profile.decode_servers / decode)
