"""Prometheus metrics of the video graph, through `ray.serve.metrics`.

Ray exports them on each node's metrics port with a `ray_` prefix (e.g.
`ray_dit_step_duration_seconds_bucket`); Serve adds deployment/replica tags.
Created inside replicas only (Ray metrics need a running Ray worker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.serve import metrics

if TYPE_CHECKING:
    from engine.engine import Ended
    from engine.messages import StepPlan
    from engine.scheduler import StepSchedulerCore

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
_GAPS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]
_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_TOKENS = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]


class ServeMetrics:
    def __init__(self) -> None:
        self.queue_length = metrics.Gauge(
            "dit_queue_length", description="Requests admitted to the pool that have not run a step yet.")
        self.active_requests = metrics.Gauge(
            "dit_active_requests", description="Requests in the step scheduler's pool (waiting + running).")
        self.batch_size = metrics.Histogram(
            "dit_batch_size", description="Requests in one denoising step.", boundaries=_COUNTS)
        self.batch_tokens = metrics.Histogram(
            "dit_batch_tokens", description="Transformer tokens in one denoising step (CFG rows counted).",
            boundaries=_TOKENS)
        self.step_duration = metrics.Histogram(
            "dit_step_duration_seconds", description="Wall time of one step on the worker: admissions, "
            "one packed forward per model, CFG, sampler steps.", boundaries=_SECONDS)
        self.time_to_first_step = metrics.Histogram(
            "dit_time_to_first_step_seconds", description="Admission to first denoising step.",
            boundaries=_SECONDS, tag_keys=("model",))
        self.requests_finished = metrics.Counter(
            "dit_requests_finished", description="Requests that left the pool, by final status.",
            tag_keys=("model", "status"))
        self.rank_busy_seconds = metrics.Counter(
            "dit_rank_busy_seconds", description="Seconds each rank of the worker group spent executing steps.",
            tag_keys=("rank",))
        self.ring_size = metrics.Histogram(
            "dit_ring_size", description="Ranks of the Brick ring of each forward row, per step.",
            boundaries=[1, 2, 4, 8])
        self.ring_bytes = metrics.Counter(
            "dit_ring_bytes", description="KV bytes the worker group's ranks sent along their rings.")
        self.group_restarts = metrics.Counter(
            "dit_group_restarts", description="Times the worker group was rebuilt after a rank or step failure.")
        self.forwards_per_step = metrics.Histogram(
            "dit_forwards_per_step", description="Transformer forwards in one step: 1 per model present "
            "(more only while isolating a failing request).", boundaries=[1, 2, 3, 4, 6, 8, 16, 32])
        self.step_shapes = metrics.Histogram(
            "dit_step_shapes", description="Distinct latent shapes packed into one step.",
            boundaries=[1, 2, 3, 4, 6, 8, 16, 32])
        self.step_gap = metrics.Histogram(
            "dit_step_gap_seconds", description="Worker idle time between two consecutive forwards while "
            "requests wait (the next plan was sent before the previous step ended).", boundaries=_GAPS)
        self.plan_bytes = metrics.Histogram(
            "dit_plan_bytes", description="Serialized size of one StepPlan (new requests' embeddings included "
            "once).", boundaries=[256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216])
        self.request_latency = metrics.Histogram(
            "dit_request_latency_seconds", description="Pool admission to last denoising step.",
            boundaries=_SECONDS, tag_keys=("model", "resolution"))
        self.job_completion_time = metrics.Histogram(
            "dit_job_completion_seconds", description="HTTP submission to finished media (encode+denoise+decode).",
            boundaries=_SECONDS, tag_keys=("model", "resolution"))
        self.stage_seconds = metrics.Histogram(
            "dit_stage_seconds", description="Seconds of each stage of a completed job: encode, queue (pool before "
            "the first step), denoise, decode_queue, decode, mux.", boundaries=_SECONDS, tag_keys=("model", "stage"))
        self.cache_hits = metrics.Counter(
            "dit_cache_hits", description="Denoising steps a request's step cache stood in for (no transformer rows, "
            "or FirstBlockCache's first block only).",
            tag_keys=("model", "mode"))
        self.step_requests = metrics.Histogram(
            "dit_step_requests", description="Requests in one step by kind: computed (all blocks ran for their "
            "rows) or cached (prediction from the request's step cache; FirstBlockCache: after the first block).",
            boundaries=_COUNTS, tag_keys=("kind",))
        self.jobs = metrics.Counter(
            "dit_jobs", description="Jobs by final status.", tag_keys=("model", "status"))

    # ---- what both step schedulers record -----------------------------------------
    def observe_step(self, plan: StepPlan, seconds: float, skipped_in_step: tuple[str, ...] = ()) -> None:
        if plan.scheduled:
            self.batch_size.observe(len(plan.scheduled))
            cached = sum(not s.computed for s in plan.scheduled) + len(skipped_in_step)
            for kind, count in (("computed", len(plan.scheduled) - cached), ("cached", cached)):
                if count:
                    self.step_requests.observe(count, tags={"kind": kind})
            self.batch_tokens.observe(plan.num_tokens)
            self.step_duration.observe(seconds)

    def observe_ended(self, ended: list[Ended]) -> None:
        for end in ended:
            self.requests_finished.inc(tags={"model": end.meta.model, "status": end.status.value})
            if end.meta.first_step_time is not None:
                self.time_to_first_step.observe(end.meta.first_step_time - end.meta.arrival_time,
                                                tags={"model": end.meta.model})

    def set_pool_gauges(self, scheduler: StepSchedulerCore) -> None:
        self.active_requests.set(len(scheduler.pool))
        self.queue_length.set(scheduler.num_waiting)
