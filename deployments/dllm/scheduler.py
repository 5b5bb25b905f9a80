"""DllmScheduler: the Serve shell of `engine.StepSchedulerCore` + `engine.DllmRunner` for diffusion LMs.

One replica owns one device: the models' weights, every pooled request's tokens and
generator (`DllmSequence`) live there, and the step loop runs the runner in a worker
thread so that the replica keeps admitting, streaming and cancelling while a step
runs. Each step packs every scheduled request (different prompt and response
lengths, different step indices) into one non-causal forward per model; requests
join and leave at every step, and SRPTF ranks them by remaining steps x tokens.

`generate()` streams `DllmPrefix` events as a request's fully unmasked response prefix
grows, then one `DllmResult`. Cancelling the stream (the client went away) cancels
the request: its slot and its device state are freed with the next step.

A trainer on the same cluster swaps a model's weights in place (`update_weights`, a state
dict from the object store; coupled-GRPO, `training.coupled_grpo`): checked against the
architecture first, then copied into the parameters by the step thread between two steps,
so no forward sees half of them and the requests in the pool carry on with the new
weights (what the coder's `pause(mode="keep")` does). A load that fails half-way reloads
the weights served before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator

import ray
import torch
from ray import serve

from api.config import DeploymentResources
from api.dllm_config import DllmModelConfig
from deployments import init_replica
from deployments.metrics import ServeMetrics
from deployments.weight_swaps import ReloadResult, WeightsInfo
from engine.config import SchedulerConfig
from engine.dllm_runner import DllmModel, DllmRunner
from engine.engine import Ended, EngineCore, Executed, StepListener
from engine.messages import NewDllmRequest, StepPlan
from engine.request import RequestStatus
from models.dllm.checkpoint import checkpoint_tensors, load_dllm, load_dllm_tokenizer, map_names
from models.dllm.config import stop_token_ids
from models.dllm.model import DiffusionLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DllmAdmitted:
    """The first item `generate()` streams: the request is in the pool (a full pool raises PoolFullError instead),
    so the ingress can answer 429 before it commits to a 200 stream."""


@dataclass(frozen=True)
class DllmPrefix:
    """Streamed when the request's fully unmasked response prefix grew (coalesced: the latest is sent)."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class DllmResult:
    """The last item `generate()` streams: the response (text before the first EOS) or why there is none."""

    status: RequestStatus
    token_ids: tuple[int, ...]
    error: str | None
    steps_done: int
    queued_seconds: float | None  # admission to first step


@dataclass
class _Waiter:
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    prefix: tuple[int, ...] = ()
    result: DllmResult | None = None


def load_models(models: list[DllmModelConfig], device: str) -> dict[str, DllmModel]:
    """Each checkpoint on `device`, with the mask and stop token ids its decoder needs."""
    loaded = {}
    for spec in models:
        path = spec.resolved_source()
        network = load_dllm(path, getattr(torch, spec.dtype), device, spec.attention_backend)
        tokenizer = load_dllm_tokenizer(path)
        loaded[spec.name] = DllmModel(network, network.config.mask_token_id, stop_token_ids(network.config, tokenizer))
    return loaded


@serve.deployment(max_ongoing_requests=100_000)
class DllmScheduler(StepListener):
    """`max_ongoing_requests` is effectively unbounded because every pooled request is an ongoing call; admission
    is bounded by `max_pool_size` instead (engine's PoolFullError -> HTTP 429 at the ingress)."""

    def __init__(self, models: list[DllmModelConfig], scheduler: SchedulerConfig,
                 resources: DeploymentResources) -> None:
        res = init_replica(resources)
        self.runner = DllmRunner(load_models(models, res.device))
        self.engine = EngineCore.from_config(scheduler)
        self.core = self.engine.scheduler
        self.metrics = ServeMetrics()
        self._device = DeviceThread(self.runner)
        self._waiters: dict[str, _Waiter] = {}
        self._loop_task: asyncio.Task | None = None
        self._largest_step = 0  # most requests packed in one step, since start
        self._ended: Counter[str] = Counter()  # requests that left the pool, by status, since start
        self._weights = {m.name: WeightsInfo(str(m.resolved_source()), 0, None, None) for m in models}
        self._sources: dict[str, str | ray.ObjectRef] = {name: w.source for name, w in self._weights.items()}  # to reload

    async def generate(self, new: NewDllmRequest) -> AsyncIterator[DllmAdmitted | DllmPrefix | DllmResult]:
        """Admit (PoolFullError when full), acknowledge, stream prefixes, then the result. Cancelling the stream
        cancels the request."""
        self._ensure_loop()
        self.engine.admit(new)
        waiter = self._waiters[new.request_id] = _Waiter()
        try:
            yield DllmAdmitted()
            sent: tuple[int, ...] = ()
            while waiter.result is None:
                await waiter.changed.wait()
                waiter.changed.clear()
                if waiter.result is None and waiter.prefix != sent:
                    sent = waiter.prefix
                    yield DllmPrefix(sent)
            yield waiter.result
        finally:
            if waiter.result is None:  # the caller went away: free the slot and, next step, the device state
                self.on_ended(self.engine.cancel(new.request_id))
            self._waiters.pop(new.request_id, None)

    async def stats(self) -> dict:
        """Pool and device state (tests and operators): nothing may be left once every request has ended."""
        return {"pooled": len(self.core.pool), "held_on_device": len(self.runner.held),
                "largest_step": self._largest_step, "ended": dict(self._ended)}

    async def load(self) -> dict:
        """The pool's remaining work (steps x tokens, an upper bound: a request may unmask its last token early)
        and the measured rate it drains at: a 429's Retry-After (None before the first step)."""
        return self.engine.drain_rate.load(self.core.remaining_token_steps())

    # ---- weights ---------------------------------------------------------------
    async def weights_info(self, model: str) -> dict:
        self._network(model)  # an unknown model is refused with the served ones
        return asdict(self._weights[model])

    async def update_weights(self, model: str, weights: list, trainer_version: int) -> dict:
        """Swap in a state dict from the object store (`[ObjectRef]`: Serve passes the reference and every replica
        reads the one stored copy). Names and shapes are checked before anything changes (ValueError naming
        them); the copy runs on the step thread between two steps."""
        started = time.perf_counter()
        network = self._network(model)
        [ref] = weights
        mapped = map_names(await ref, network)
        loop = asyncio.get_running_loop()
        load_started, loaded = await loop.run_in_executor(self._device.thread, self._load, model, network, mapped,
                                                          ref)
        done = time.perf_counter()
        self._weights[model] = WeightsInfo("memory", self._weights[model].version + 1, trainer_version, done - started)
        return asdict(ReloadResult("memory", self._weights[model].version, trainer_version, load_started - started,
                                   loaded - load_started, done - started))

    def _network(self, model: str) -> DiffusionLM:
        if model not in self.runner.models:
            raise ValueError(f"model {model!r} is not served here; served: {sorted(self.runner.models)}")
        return self.runner.models[model].network

    def _load(self, model: str, network: DiffusionLM, mapped: dict,
              source: ray.ObjectRef) -> tuple[float, float]:
        """On the step thread: copy `mapped` into the parameters; if that fails half-way, the previous weights
        (`self._sources[model]`: a checkpoint directory or an object reference) are copied back."""
        started = time.perf_counter()
        tied = network.config.tie_word_embeddings
        try:
            network.load_state_dict(mapped, strict=not tied)
        except Exception:
            logger.exception("loading new weights into %s failed; restoring the previous ones", model)
            previous = self._sources[model]
            tensors = ray.get(previous) if isinstance(previous, ray.ObjectRef) else checkpoint_tensors(Path(previous))
            network.load_state_dict(map_names(tensors, network), strict=not tied)
            raise
        self._sources[model] = source
        return started, time.perf_counter()

    # ---- the loop: the engine's, this shell listens -------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self.engine.run(self._device, self))

    def on_step(self, plan: StepPlan, executed: Executed, pipelined: bool) -> None:
        self._largest_step = max(self._largest_step, len(plan.scheduled))
        self.metrics.observe_step(plan, executed.seconds)
        for request_id, prefix in executed.result.prefixes.items():
            if (waiter := self._waiters.get(request_id)) is not None:
                waiter.prefix = prefix
                waiter.changed.set()

    def on_ended(self, ended: list[Ended]) -> None:
        self.metrics.observe_ended(ended)
        for end in ended:
            self._ended[end.status.value] += 1
            if (waiter := self._waiters.get(end.meta.request_id)) is not None:
                waiter.result = _result_of(end)
                waiter.changed.set()
        self.metrics.set_pool_gauges(self.core)


class DeviceThread:
    """The engine's executor on this replica's one device: each step runs on a worker thread (the device's one
    stream), so the replica keeps admitting, streaming and cancelling meanwhile. A step that raises outside the
    runner's per-request isolation fails that step's requests; the others keep their state."""

    pipeline_depth = 1

    def __init__(self, runner: DllmRunner) -> None:
        self.runner = runner
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-step")

    async def execute(self, plan: StepPlan) -> Executed:
        result = await asyncio.get_running_loop().run_in_executor(self.thread, self.runner.execute, plan)
        return Executed(result, (result.forward_seconds,))

    async def recover(self, reason: str) -> bool:
        return False


def _result_of(end: Ended) -> DllmResult:
    meta = end.meta
    queued = None if meta.first_step_time is None else meta.first_step_time - meta.arrival_time
    return DllmResult(end.status, end.output or (), end.error, meta.steps_done, queued)
