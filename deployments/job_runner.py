"""JobRunner: drives video jobs from the job store, so that no process holds a job only in its memory.

The ingress replicas write a job to the store and nudge the runner (`submit`); the
runner runs it through the graph (`MediaPipeline`: the runner passes references along,
the decoder writes the mp4 to the blob store) and writes its progress and status to the
store. Any ingress replica answers any job from the store. One runner per application:
when it starts (first deploy, or Serve replacing a dead one, or the whole app restarted
on the same data directory) it re-admits every unfinished job from its stored spec (same
seed, same bytes), counting a restart, and a job restarted more than `max_job_restarts`
times fails with that reason. A periodic sweep adopts queued jobs nobody drives (a lost
nudge) and deletes jobs and files past their retention.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from api.config import StoreConfig
from deployments.errors import Overloaded
from deployments.metrics import ServeMetrics
from deployments.pipeline import GenerationCancelled, MediaPipeline, SchedulerLost
from deployments.step_scheduler import ProgressEvent
from deployments.store.blobs import BlobStore, input_image_name
from deployments.store.jobs import JobRecord, open_job_store

logger = logging.getLogger(__name__)

OVERLOAD_RETRY_S = 1.0
RESTART_DELAY_S = 2.0  # after a scheduler replica died: Serve replaces it meanwhile


@serve.deployment(max_ongoing_requests=10_000)
class JobRunner:
    async def __init__(self, store: StoreConfig, text_encoder: DeploymentHandle, scheduler: DeploymentHandle,
                       vae: DeploymentHandle) -> None:
        self.config = store
        self.jobs = open_job_store(self.config.resolved_jobs_url())
        self.blobs = BlobStore(self.config.resolved_blobs_url())
        self.pipeline = MediaPipeline(text_encoder, scheduler, vae)
        self.metrics = ServeMetrics()
        self._tasks: dict[str, asyncio.Task] = {}
        for record in self.jobs.unfinished():  # what a previous runner (or app) was driving when it died
            self._restart(record, "the process driving it stopped")
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def submit(self, job_id: str) -> None:
        """Start driving a job the ingress just stored (idempotent)."""
        record = self.jobs.get(job_id)
        if record is not None and not record.done:
            self._drive(record)

    async def cancel(self, job_id: str) -> None:
        """The ingress marked the job cancelled in the store: stop its request (it leaves the pool at once)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def stats(self) -> dict:
        return {"driving": sorted(self._tasks)}

    # ---- driving ---------------------------------------------------------------
    def _drive(self, record: JobRecord, delay_s: float = 0.0) -> None:
        if record.id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(record, delay_s))
        self._tasks[record.id] = task
        task.add_done_callback(lambda done: self._tasks.pop(record.id) if self._tasks.get(record.id) is done else None)

    def _restart(self, record: JobRecord, reason: str, delay_s: float = 0.0) -> None:
        if record.restarts >= self.config.max_job_restarts:
            self.jobs.update(record.id, status="failed", completed_at=time.time(),
                             error=f"{reason}; restarted {record.restarts} times already")
            self.metrics.jobs.inc(tags={"model": record.spec.model, "status": "failed"})
            return
        restarted = self.jobs.update(record.id, status="queued", step=0, started_at=None,
                                     restarts=record.restarts + 1)
        if restarted is not None and not restarted.done:
            logger.warning("job %s re-admitted from its spec (%s; restart %d)", record.id, reason, restarted.restarts)
            self._drive(restarted, delay_s)

    async def _run(self, record: JobRecord, delay_s: float) -> None:
        spec, tags = record.spec, {"model": record.spec.model, "resolution": record.resolution}
        await asyncio.sleep(delay_s)
        # image-to-video: the bytes the ingress stored beside the job, read by the VAE decoder
        image_blob = None if spec.input_image is None else self.blobs.path(input_image_name(record.id))
        while True:
            try:
                generated = await self.pipeline.generate(record.id, spec, "mp4", self._progress_writer(record.id),
                                                               image_blob, blob_name=f"{record.id}.mp4")
            except (GenerationCancelled, asyncio.CancelledError):
                return  # the ingress already stored the cancellation
            except Overloaded:  # admitted by an ingress whose count was behind: wait for room, stay queued
                await asyncio.sleep(OVERLOAD_RETRY_S)
                continue
            except SchedulerLost as exc:  # the scheduler replica died with the request: run it again
                logger.warning("job %s: %s", record.id, exc)
                current = self.jobs.get(record.id)
                if current is not None and not current.done:
                    self._tasks.pop(record.id, None)
                    self._restart(current, str(exc), RESTART_DELAY_S)
                return
            except Exception as exc:
                logger.warning("job %s failed: %s", record.id, exc)
                self._finish(record, "failed", error=failure_reason(exc))
                return
            break
        decoded, stages = generated.decoded, generated.stages
        self._finish(record, "completed", blob=decoded.blob, step=spec.num_inference_steps, stages=stages.as_dict(),
                     computed_steps=generated.computed_steps)
        self.metrics.job_completion_time.observe(time.time() - record.created_at, tags=tags)
        self.metrics.request_latency.observe(stages.queue_s + stages.denoise_s, tags=tags)
        for stage, seconds in stages.as_dict().items():
            self.metrics.stage_seconds.observe(seconds, tags={"model": spec.model, "stage": stage.removesuffix("_s")})

    def _finish(self, record: JobRecord, status: str, **fields) -> None:
        stored = self.jobs.update(record.id, status=status, completed_at=time.time(), **fields)
        if stored is not None and stored.status == status:  # not already cancelled
            self.metrics.jobs.inc(tags={"model": record.spec.model, "status": status})

    def _progress_writer(self, job_id: str):
        def write(event: ProgressEvent) -> None:
            changes = {"step": event.steps_done}
            if event.first_step_time is not None:
                changes.update(status="running", started_at=event.first_step_time)
            self.jobs.update(job_id, **changes)
        return write

    # ---- housekeeping -------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self._sweep()
            except Exception:
                logger.exception("job store sweep failed")

    async def _sweep(self) -> None:
        for record in self.jobs.unfinished():
            if record.status == "queued" and record.id not in self._tasks:  # its nudge was lost
                self._drive(record)
        expired = self.jobs.expired(time.time() - self.config.ttl_s)
        for record in expired:
            if record.blob:
                await asyncio.to_thread(self.blobs.delete, record.blob)
            if record.spec.input_image is not None:
                await asyncio.to_thread(self.blobs.delete, self.blobs.path(input_image_name(record.id)))
        self.jobs.delete([r.id for r in expired])


def failure_reason(exc: Exception) -> str:
    """What a failed job reports: a replica's exception as it raised it, without Ray's remote traceback."""
    return str(exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc)
