"""VideoIngress: the HTTP front door (FastAPI) of the video graph.

POST /v1/videos validates, answers 202 with a job id at once, and starts one
coroutine per job: encode prompt -> step scheduler (which owns the denoising loop
and streams the job's progress back) -> VAE decode -> mp4 in the job table.
DELETE cancels the job's coroutine, whose cancelled stream drops the request.
"""


import asyncio
import base64
import logging
import time
import uuid
from dataclasses import replace

from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.errors import Overloaded, install_error_handlers
from deployments.jobs import Job, JobTable
from deployments.metrics import ServeMetrics
from deployments.step_scheduler import GenerationResult, ProgressEvent
from deployments.text_encoder import EncodeRequest
from deployments.vae_decoder import DecodeRequest
from engine.request import GenerationSpec, RequestStatus
from engine.scheduler import PoolFullError
from models import load_adapter
from models.spec import ModelSpec
from serve_graph.config import LimitsConfig
from serve_graph.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelList,
    VideoGenerationRequest,
    VideoJob,
)
from serve_graph.validation import InvalidRequest, RequestValidator, ServedModel

logger = logging.getLogger(__name__)
app = FastAPI(title="DiT-Serve video API")
install_error_handlers(app)


def _card(served: ServedModel) -> ModelCard:
    spec, video = served.spec, served.kind == "video"
    return ModelCard(id=spec.name, family=spec.family, kind=served.kind,
                     resolutions=dict(spec.resolution_heights) if video else None,
                     num_frames=served.frame_counts if video else None,
                     max_image_side=None if video else spec.max_image_side,
                     size_multiple=served.geometry.pixel_multiple, default_steps=spec.default_steps)


class _Cancelled(Exception):
    """The job was cancelled before its request left the pool."""


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class VideoIngress:
    """Job table lives in this replica's memory: run one ingress replica per app (see configs/)."""

    def __init__(self, models: list[dict], limits: dict, max_pool_size: int, text_encoder: DeploymentHandle,
                 scheduler: DeploymentHandle, vae: DeploymentHandle) -> None:
        specs = [ModelSpec(**m) for m in models]
        self.limits = LimitsConfig(**limits)
        self.served = {s.name: ServedModel(s, load_adapter(s, parts=()).geometry) for s in specs}
        self.validator = RequestValidator(self.served, self.limits.max_prompt_chars)
        self.max_active = max_pool_size
        self.jobs = JobTable(self.limits.max_retained_jobs)
        self.text_encoder, self.scheduler, self.vae = text_encoder, scheduler, vae
        self.metrics = ServeMetrics()
        self._tasks: dict[str, asyncio.Task] = {}  # job id -> the coroutine driving it
        self._active_images = 0

    # ---- routes ----------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self) -> ModelList:
        return ModelList(data=[_card(m) for m in self.served.values()])

    @app.post("/v1/videos", status_code=202)
    async def create_video(self, body: VideoGenerationRequest) -> VideoJob:
        resolved = self.validator.video(body)
        self._admit_or_raise()
        job = Job(id=f"video_{uuid.uuid4().hex}", request=resolved, resolution=body.resolution)
        self.jobs.add(job)
        task = asyncio.get_running_loop().create_task(self._run_job(job))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job.view()

    @app.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str) -> VideoJob:
        return self._job(video_id).view()  # progress arrives on the job's stream from the scheduler

    @app.get("/v1/videos/{video_id}/content")
    async def get_video_content(self, video_id: str) -> Response:
        job = self._job(video_id)
        if job.status != "completed" or job.content is None:
            raise InvalidRequest("video_id", f"video {video_id} is {job.status}; content exists once completed", 409)
        return Response(content=job.content, media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def cancel_video(self, video_id: str) -> VideoJob:
        job = self._job(video_id)
        if job.status == "completed":
            raise InvalidRequest("video_id", f"video {video_id} already completed", 409)
        if not job.done:
            job.finish("cancelled")
            task = self._tasks.get(job.id)
            if task is not None:
                task.cancel()  # cancels its stream: the scheduler drops the request at once
        return job.view()

    @app.post("/v1/images/generations")
    async def create_image(self, body: ImageGenerationRequest) -> ImageGenerationResponse:
        resolved = self.validator.image(body)
        self._admit_or_raise(body.n)
        self._active_images += body.n
        try:
            results = await asyncio.gather(*(
                self._generate(f"image_{uuid.uuid4().hex}", replace(resolved, seed=resolved.seed + i), "png")
                for i in range(body.n)))
        finally:
            self._active_images -= body.n
        return ImageGenerationResponse(
            created=int(time.time()), model=resolved.model,
            data=[ImageData(b64_json=base64.b64encode(png).decode(), seed=resolved.seed + i)
                  for i, png in enumerate(results)])

    # ---- the job pipeline ---------------------------------------------------
    async def _run_job(self, job: Job) -> None:
        r = job.request
        tags = {"model": r.model, "resolution": job.resolution}
        try:
            mp4 = await self._generate(job.id, r, "mp4", job=job)
        except (_Cancelled, asyncio.CancelledError):
            pass
        except Exception as exc:
            logger.warning("job %s failed: %s", job.id, exc)
            job.finish("failed", error=str(exc))
        else:
            job.finish("completed", content=mp4)
            self.metrics.job_completion_time.observe(time.time() - job.created_at, tags=tags)
        self.metrics.jobs.inc(tags={"model": r.model, "status": job.status})

    async def _generate(self, request_id: str, r: GenerationSpec, media: str, job: Job | None = None) -> bytes:
        prompt = await self.text_encoder.encode.remote(EncodeRequest(r.model, r.prompt, r.negative_prompt))
        if job is not None and job.done:  # cancelled while encoding: never enters the pool
            raise _Cancelled()
        result: GenerationResult | None = None
        stream = self.scheduler.options(stream=True).generate.remote(request_id, r, prompt)
        try:
            async for item in stream:
                if isinstance(item, ProgressEvent):
                    if job is not None:
                        job.observe_progress(item.steps_done, item.first_step_time)
                else:
                    result = item
        except asyncio.CancelledError:
            stream.cancel()  # the job was cancelled: the scheduler drops the request
            raise
        except PoolFullError as exc:
            raise RuntimeError(f"overloaded: {exc}") from exc
        except RayActorError as exc:
            raise RuntimeError(f"the step scheduler replica holding this request died: {exc}") from exc
        if result is None:
            raise RuntimeError("the step scheduler ended the request's stream without a result")
        if result.status is RequestStatus.CANCELLED:
            raise _Cancelled()
        if result.status is not RequestStatus.FINISHED:
            raise RuntimeError(result.error or f"generation ended as {result.status.value}")
        if job is not None:
            job.observe_progress(r.num_inference_steps, result.first_step_time)
        if result.finish_time is not None:
            self.metrics.request_latency.observe(result.finish_time - result.arrival_time,
                                                 tags={"model": r.model, "resolution": job.resolution if job else
                                                       f"{r.width}x{r.height}"})
        return await self.vae.decode.remote(DecodeRequest(r.model, result.latents, media, r.fps))

    # ---- helpers -------------------------------------------------------------
    def _job(self, video_id: str) -> Job:
        job = self.jobs.get(video_id)
        if job is None:
            raise InvalidRequest("video_id", f"no video with id {video_id!r}", 404)
        return job

    def _admit_or_raise(self, n: int = 1) -> None:
        active = self.jobs.active() + self._active_images
        if active + n > self.max_active:
            raise Overloaded(f"server is at capacity ({active} active of {self.max_active}); retry later")
