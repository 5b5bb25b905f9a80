"""A simulator cost profile of a running video app, from what the app itself measured.

The step scheduler learns its step-cost model online (`engine.step_cost`: per model,
fixed seconds plus seconds per unit of busiest-rank work) and the VAE decoder measures
its decode + mux seconds per latent element; `StepScheduler.stats()` and
`VaeDecoder.load()` report both. `AppProfile` prices a `StepPlan` with those
coefficients, a job's decode with that rate and its prompt encoding with the mean
`encode_s` the jobs reported, on the app's own ranks and planner. The measured figures
already carry the contention they ran under (steps beside decodes, decodes beside
steps), so by default nothing more is shared (`shared_cores` None); the decoder's slots
and the ranks each running decode displaces are the app's (`decode_concurrency`,
`decode_displaces_ranks`). So the
simulator can replay the same trace the real app served, on the same machine's figures,
and its ranking of the systems can be checked against the real one
(`benchmarks.end_to_end`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from api.schemas import VideoGenerationRequest
from api.validation import RequestValidator, ServedModel
from benchmarks.cost_profiles import CostProfile
from benchmarks.workloads import TraceRequest
from engine.config import PlannerConfig
from engine.messages import NewRequest, StepPlan
from engine.step_cost import plan_work
from models import load_adapter
from models.spec import ModelSpec


@dataclass(frozen=True)
class MeasuredApp:
    """The figures a running app reported: step-cost coefficients per model, decode seconds per latent element,
    mean encode seconds."""

    step_cost: dict[str, tuple[float, float]]
    decode_seconds_per_element: float
    encode_s: float


class AppProfile(CostProfile):

    def __init__(self, app_args: dict, measured: MeasuredApp, model_names: dict[str, str],
                 shared_cores: int | None = 2) -> None:
        """`app_args`: the video app's args (models, scheduler, worker_group); `model_names`: trace family ->
        served model name."""
        self.specs = {m["name"]: ModelSpec(**m) for m in app_args["models"]}
        self.adapters = {name: load_adapter(spec, parts=()) for name, spec in self.specs.items()}
        self.validator = RequestValidator({n: ServedModel.of(adapter) for n, adapter in self.adapters.items()},
                                          10**6)
        self.world_size = app_args["worker_group"]["ranks"]
        self.planner = PlannerConfig(**app_args["scheduler"].get("planner", {}))
        self.cost = self.planner.cost_model(self.world_size)
        self.measured, self.model_names, self.shared_cores = measured, model_names, shared_cores
        self.decode_servers = app_args.get("decode_concurrency", 1)  # the app's one VAE replica's decode slots
        self.decode_displaces_ranks = app_args.get("decode_displaces_ranks", 0)
        self._requests: dict[tuple, NewRequest] = {}

    def _new_request(self, request: TraceRequest) -> NewRequest:
        key = (request.model, request.resolution, request.num_frames)
        if key not in self._requests:
            name = self.model_names[request.model]
            spec = self.validator.video(VideoGenerationRequest(model=name, prompt="x", resolution=request.resolution,
                                                               num_frames=request.num_frames, seed=0))
            self._requests[key] = NewRequest.from_spec("profile", spec, None, self.adapters[name])
        return self._requests[key]

    def row_tokens(self, request: TraceRequest) -> tuple[int, ...]:
        return self._new_request(request).row_tokens

    def step_seconds(self, plan: StepPlan) -> float:
        work = plan_work(plan, self.cost)
        return sum(fixed + per_work * work[model] for model, (fixed, per_work) in
                   ((m, self.measured.step_cost[self.model_names.get(m, m)]) for m in work))

    def encode_seconds(self, request: TraceRequest) -> float:
        return self.measured.encode_s

    def decode_seconds(self, request: TraceRequest) -> float:
        elements = math.prod(self._new_request(request).latent_shape)
        return elements * self.measured.decode_seconds_per_element
