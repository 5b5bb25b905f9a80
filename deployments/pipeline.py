"""One generation through the video graph: encode the prompt -> the step scheduler's pool -> VAE decode.

Shared by the job runner (videos, driven from the job store) and the ingress's
synchronous image route. The scheduler streams the request's progress and then its
result; cancelling the caller cancels the stream, which drops the request from the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.errors import Overloaded
from deployments.step_scheduler import GenerationResult, ProgressEvent
from deployments.text_encoder import EncodeRequest
from deployments.vae_decoder import DecodeRequest
from engine.request import GenerationSpec, RequestStatus
from engine.scheduler import PoolFullError


class SchedulerLost(RuntimeError):
    """The scheduler replica holding the request died: the request may be run again from its spec."""


class GenerationCancelled(Exception):
    """The request was cancelled before it left the pool."""


class MediaPipeline:
    def __init__(self, text_encoder: DeploymentHandle, scheduler: DeploymentHandle, vae: DeploymentHandle) -> None:
        self.text_encoder, self.scheduler, self.vae = text_encoder, scheduler, vae

    async def generate(self, request_id: str, spec: GenerationSpec, media: str,
                       on_progress: Callable[[ProgressEvent], None] | None = None) -> tuple[bytes, GenerationResult]:
        """The media bytes (mp4 or png) and the scheduler's result (timings) of one request."""
        prompt = await self.text_encoder.encode.remote(EncodeRequest(spec.model, spec.prompt, spec.negative_prompt))
        result: GenerationResult | None = None
        stream = self.scheduler.options(stream=True).generate.remote(request_id, spec, prompt)
        try:
            async for item in stream:
                if isinstance(item, ProgressEvent):
                    if on_progress is not None:
                        on_progress(item)
                else:
                    result = item
        except asyncio.CancelledError:
            stream.cancel()  # the job was cancelled: the scheduler drops the request
            raise
        except PoolFullError as exc:
            raise Overloaded(f"server is at capacity: {exc}") from exc
        except RayActorError as exc:
            raise SchedulerLost(f"the step scheduler replica holding this request died: {exc}") from exc
        if result is None:
            raise RuntimeError("the step scheduler ended the request's stream without a result")
        if result.status is RequestStatus.CANCELLED:
            raise GenerationCancelled()
        if result.status is not RequestStatus.FINISHED:
            raise RuntimeError(result.error or f"generation ended as {result.status.value}")
        media_bytes = await self.vae.decode.remote(DecodeRequest(spec.model, result.latents, media, spec.fps))
        return media_bytes, result
