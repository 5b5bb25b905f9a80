"""One generation through the video graph: encode the prompt (and the input image) -> the step scheduler's pool
-> VAE decode (-> the blob store).

Shared by the job runner (videos, driven from the job store) and the ingress's
synchronous image route. The caller only passes references along: the encoder's
embeddings go to the scheduler as a Serve response (the scheduler's replica receives
them from the encoder), the final latents come back as an object reference the VAE
decoder's replica resolves, and a video's mp4 is written to the blob store by the
decoder. The scheduler streams the request's progress and then its result; cancelling
the caller cancels the stream, which drops the request from the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.errors import Overloaded
from deployments.step_scheduler import GenerationResult, ProgressEvent
from deployments.text_encoder import EncodeRequest
from deployments.vae_decoder import Decoded, DecodeRequest, ImageEncodeRequest
from engine.request import GenerationSpec, RequestStatus
from engine.scheduler import PoolFullError


class SchedulerLost(RuntimeError):
    """The scheduler replica holding the request died: the request may be run again from its spec."""


class GenerationCancelled(Exception):
    """The request was cancelled before it left the pool."""


@dataclass(frozen=True)
class StageTimes:
    """Where one job's seconds went, stage by stage (what `GET /v1/videos/{id}` reports as `stages`)."""

    encode_s: float  # the job's start -> its admission to the pool: prompt (and image) encoding and the hand-off
    queue_s: float  # in the step scheduler's pool before its first step
    denoise_s: float  # first step to last step
    decode_queue_s: float  # waiting for the VAE decoder, in the policy's order
    decode_s: float  # VAE decode
    mux_s: float  # frames -> mp4 / png (stored in the blob store for a video)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Generated:
    """A finished generation: the decoder's answer, where its seconds went, and how many of its denoising steps ran
    the transformer (fewer than its steps under a step cache)."""

    decoded: Decoded
    stages: StageTimes
    computed_steps: int


class MediaPipeline:
    def __init__(self, text_encoder: DeploymentHandle, scheduler: DeploymentHandle, vae: DeploymentHandle) -> None:
        self.text_encoder, self.scheduler, self.vae = text_encoder, scheduler, vae

    async def generate(self, request_id: str, spec: GenerationSpec, media: str,
                       on_progress: Callable[[ProgressEvent], None] | None = None,
                       image_blob: str | None = None, blob_name: str | None = None) -> Generated:
        """The decoder's answer (the media bytes, or the blob path when `blob_name` is given), the seconds each stage
        took and the steps computed; `image_blob` is the stored input image of an image-to-video request, whose latents
        join the prompt's rows."""
        encode_start = time.time()
        prompt = self.text_encoder.encode.remote(EncodeRequest(spec.model, spec.prompt, spec.negative_prompt))
        condition = None if image_blob is None else self.vae.encode_image.remote(
            ImageEncodeRequest(spec.model, image_blob, spec.height, spec.width, spec.num_frames, spec.seed))
        result: GenerationResult | None = None
        stream = self.scheduler.options(stream=True).generate.remote(request_id, spec, prompt, condition)
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
        if result.status is not RequestStatus.FINISHED or result.latents is None:
            raise RuntimeError(result.error or f"generation ended as {result.status.value}")
        request = DecodeRequest(spec.model, result.latent_elements, media, spec.fps, result.arrival_time, blob_name)
        try:
            decoded: Decoded = await self.vae.decode.remote(request, result.latents)
        except ObjectLostError as exc:  # the scheduler replica that held the final latents died since
            raise SchedulerLost(f"the final latents were lost with their scheduler replica: {exc}") from exc
        first_step = result.first_step_time if result.first_step_time is not None else result.arrival_time
        return Generated(decoded, StageTimes(
            encode_s=max(0.0, result.arrival_time - encode_start), queue_s=first_step - result.arrival_time,
            denoise_s=(result.finish_time or first_step) - first_step, decode_queue_s=decoded.queue_s,
            decode_s=decoded.decode_s, mux_s=decoded.mux_s), result.computed_steps)
