"""VideoIngress: the HTTP front door (FastAPI) of the video graph; any number of replicas.

POST /v1/videos (a JSON or multipart body; image-to-video models take the first frame's image as
`input_reference`, stored beside the job) validates, writes the job to the job store (an `Idempotency-Key`
returns the job created before with that key), nudges the `JobRunner` that drives it
and answers 202 with its id at once. Every read (status, list, content) comes from the
job store and the blob store, so any replica answers any job, and no restart of a
replica, the runner or the app loses one. With API keys configured every route but
/healthz needs one, and a job is visible only to the key that created it. DELETE marks the job cancelled in the store
and tells the runner, whose cancelled stream drops the request from the pool. Images
(`/v1/images/generations`) are synchronous: the replica runs them itself.
"""


import asyncio
import base64
import time
import uuid
from dataclasses import replace
from typing import Optional, get_args

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from api.config import AuthConfig, LimitsConfig, StoreConfig
from api.input_image import FIELD, image_digest, open_image
from api.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelList,
    VideoGenerationRequest,
    VideoJob,
    VideoJobList,
)
from api.validation import InvalidRequest, RequestValidator, ServedModel
from deployments.api_keys import ApiKeys
from deployments.drain import drain_seconds, overloaded
from deployments.errors import install_error_handlers
from deployments.pipeline import MediaPipeline
from deployments.store.blobs import BlobStore, input_image_name
from deployments.store.jobs import JobRecord, open_job_store
from deployments.video_request import read_video_request
from engine.request import GenerationSpec
from models import load_adapter
from models.spec import AspectRatio, ModelSpec

EVENTS_POLL_S = 0.25  # how often an events stream reads its job from the store
_VIDEO_SCHEMA = VideoGenerationRequest.model_json_schema()
_VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _VIDEO_SCHEMA},
    "multipart/form-data": {"schema": {**_VIDEO_SCHEMA, "properties": {
        **_VIDEO_SCHEMA["properties"],
        FIELD: {"type": "string", "format": "binary", "description": "Image-to-video: the first frame's image."}}}},
}}}
"""POST /v1/videos reads its body itself (`read_video_request`): its OpenAPI body, for clients and the fuzz."""
app = FastAPI(title="DiT-Serve video API")
install_error_handlers(app)


def _card(served: ServedModel) -> ModelCard:
    spec, video = served.spec, served.media == "video"
    return ModelCard(id=spec.name, family=spec.family, kind=served.kind,
                     resolutions=dict(spec.resolution_heights) if video else None,
                     num_frames=served.frame_counts if video else None,
                     aspect_ratios=list(spec.aspect_ratios or get_args(AspectRatio)) if video else None,
                     max_image_side=None if video else spec.max_image_side,
                     size_multiple=served.geometry.pixel_multiple, default_steps=spec.default_steps,
                     experts=served.experts)


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class VideoIngress:
    def __init__(self, models: list[ModelSpec], limits: LimitsConfig, store: StoreConfig, auth: AuthConfig,
                 max_pool_size: int,
                 text_encoder: DeploymentHandle, scheduler: DeploymentHandle, vae: DeploymentHandle,
                 runner: DeploymentHandle) -> None:
        self.limits = limits
        self.served = {s.name: ServedModel.of(load_adapter(s, parts=())) for s in models}
        self.validator = RequestValidator(self.served, self.limits.max_prompt_chars)
        self.max_active = max_pool_size
        self.jobs = open_job_store(store.resolved_jobs_url())
        self.blobs = BlobStore(store.resolved_blobs_url())
        self.pipeline = MediaPipeline(text_encoder, scheduler, vae)
        self.scheduler, self.runner, self.vae = scheduler, runner, vae
        self.keys = ApiKeys(auth)
        self._active_images = 0

    # ---- routes ----------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self, authorization: Optional[str] = Header(default=None)) -> ModelList:
        self.keys.owner(authorization)
        return ModelList(data=[_card(m) for m in self.served.values()])

    @app.post("/v1/videos", status_code=202, openapi_extra=_VIDEO_BODY)
    async def create_video(self, request: Request,
                           idempotency_key: Optional[str] = Header(default=None, max_length=256),
                           authorization: Optional[str] = Header(default=None)) -> VideoJob:
        owner = self.keys.owner(authorization)
        body, image = await read_video_request(request)
        digest = None if image is None else image_digest(image)
        resolved = self.validator.video(body, digest)
        if image is not None:
            await asyncio.to_thread(open_image, image)  # format, bytes and sides: a 400 naming input_reference
        if idempotency_key is not None and (known := self.jobs.find_by_key(owner, idempotency_key)) is not None:
            return self._repeated(known, body, resolved)
        await self._admit_or_raise()
        new_id = f"video_{uuid.uuid4().hex}"
        if image is not None:  # stored before the job, so whoever drives (or replays) the job finds it
            await asyncio.to_thread(self.blobs.put, input_image_name(new_id), image)
        record = self.jobs.create(JobRecord(id=new_id, spec=resolved, owner=owner,
                                            resolution=self.validator.video_resolution(body, digest),
                                            idempotency_key=idempotency_key))
        if record.id != new_id:  # the same key raced in through another replica: its job stands
            if image is not None:
                await asyncio.to_thread(self.blobs.delete, self.blobs.path(input_image_name(new_id)))
            return self._repeated(record, body, resolved)
        await self.runner.submit.remote(record.id)
        return await self._view(record)

    @app.get("/v1/videos")
    async def list_videos(self, limit: int = Query(default=20, ge=1, le=100),
                          after: Optional[str] = Query(default=None, max_length=100),
                          authorization: Optional[str] = Header(default=None)) -> VideoJobList:
        owner = self.keys.owner(authorization)
        if after is not None:
            self._job(after, owner, param="after")
        page = self.jobs.list(owner=owner, limit=limit + 1, after=after)
        data = [r.view() for r in page[:limit]]
        return VideoJobList(data=data, has_more=len(page) > limit, first_id=data[0].id if data else None,
                            last_id=data[-1].id if data else None)

    @app.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str, authorization: Optional[str] = Header(default=None)) -> VideoJob:
        return await self._view(self._job(video_id, self.keys.owner(authorization)))

    @app.get("/v1/videos/{video_id}/events")
    async def video_events(self, video_id: str, authorization: Optional[str] = Header(default=None)):
        """Server-sent events: the job (as GET returns it) whenever its status or step changes, until it ends.
        Read from the store, so any replica serves any job's events."""
        job = self._job(video_id, self.keys.owner(authorization))

        async def events():
            nonlocal job
            sent = None
            while True:
                if (job.status, job.step) != sent:
                    sent = (job.status, job.step)
                    yield f"event: {job.status}\ndata: {job.view().model_dump_json()}\n\n"
                if job.done:
                    return
                await asyncio.sleep(EVENTS_POLL_S)
                job = self.jobs.get(video_id) or job

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/videos/{video_id}/content")
    async def get_video_content(self, video_id: str, authorization: Optional[str] = Header(default=None)) -> Response:
        job = self._job(video_id, self.keys.owner(authorization))
        if job.status != "completed" or job.blob is None:
            raise InvalidRequest("video_id", f"video {video_id} is {job.status}; content exists once completed", 409)
        return Response(content=await asyncio.to_thread(self.blobs.get, job.blob), media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def cancel_video(self, video_id: str, authorization: Optional[str] = Header(default=None)) -> VideoJob:
        job = self._job(video_id, self.keys.owner(authorization))
        if job.status == "completed":
            raise InvalidRequest("video_id", f"video {video_id} already completed", 409)
        if not job.done:
            job = self.jobs.update(video_id, status="cancelled", completed_at=time.time()) or job
            await self.runner.cancel.remote(video_id)  # its request leaves the pool at once
        return job.view()

    @app.post("/v1/images/generations")
    async def create_image(self, body: ImageGenerationRequest,
                           authorization: Optional[str] = Header(default=None)) -> ImageGenerationResponse:
        self.keys.owner(authorization)
        resolved = self.validator.image(body)
        await self._admit_or_raise(body.n)
        self._active_images += body.n
        try:
            results = await asyncio.gather(*(
                self.pipeline.generate(f"image_{uuid.uuid4().hex}", replace(resolved, seed=resolved.seed + i), "png")
                for i in range(body.n)))
        finally:
            self._active_images -= body.n
        return ImageGenerationResponse(
            created=int(time.time()), model=resolved.model,
            data=[ImageData(b64_json=base64.b64encode(result.decoded.media).decode(), seed=resolved.seed + i)
                  for i, result in enumerate(results)])

    # ---- helpers -------------------------------------------------------------
    def _job(self, video_id: str, owner: str, param: str = "video_id") -> JobRecord:
        """The owner's job; another key's job answers 404 exactly as a job that does not exist."""
        job = self.jobs.get(video_id)
        if job is None or job.owner != owner:
            raise InvalidRequest(param, f"no video with id {video_id!r}", 404)
        return job

    @staticmethod
    def _repeated(known: JobRecord, body: VideoGenerationRequest, resolved: GenerationSpec) -> VideoJob:
        """A POST that reused an Idempotency-Key: the job created then if it is the same request (a seed left unset
        was drawn for the first one), else 409."""
        if replace(known.spec, seed=resolved.seed if body.seed is None else known.spec.seed) != resolved:
            raise InvalidRequest("Idempotency-Key", "this key was used for a different request", 409)
        return known.view()

    async def _admit_or_raise(self, n: int = 1) -> None:
        """429 when the pool holds `max_pool_size` requests, or when the admitted work exceeds `max_backlog_s`."""
        active = self.jobs.count_unfinished() + self._active_images
        if active + n > self.max_active:
            raise overloaded(f"server is at capacity ({active} active of {self.max_active})",
                             await self._drain_seconds())
        limit = self.limits.max_backlog_s
        if limit is None:
            return
        backlog = (await self._drain_seconds() or 0.0) + (await self.vae.load.remote())["backlog_seconds"]
        if backlog > limit:
            raise overloaded(f"server is at capacity ({backlog:.0f} s of admitted work, max_backlog_s {limit:g})",
                             backlog - limit)

    async def _drain_seconds(self) -> float | None:
        """The pool's remaining work over the rate the scheduler measured it drains at (None before any step)."""
        return drain_seconds(await self.scheduler.load.remote())

    async def _view(self, job: JobRecord) -> VideoJob:
        view = job.view()
        if job.status == "queued":
            view.estimated_start_seconds = await self._drain_seconds()
        return view
