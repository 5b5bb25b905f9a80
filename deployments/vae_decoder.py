"""VaeDecoder: final latents -> frames -> mp4 / png (a video stored in the blob store), the job's last stage, in
the scheduler's policy order; and the input image of an image-to-video job -> its latents, at the job's start.

The decode is part of a job's latency (seconds per video on CPU here, minutes for
720p HunyuanVideo / Wan on a GPU without tiling), so its queue is scheduled like the
denoising steps: a replica decodes `concurrency` requests at a time and takes the next
one by the step scheduler's policy (`SchedulingPolicy.decode_priority`: FIFO by the
job's arrival, SRPTF by the decode's size, the latents' element count, so a short
video is not stuck behind a long one). Each answer reports how long the request waited
in this queue, decoded and muxed. The latents arrive as an object reference the scheduler's
replica put (Ray resolves it here), and a video's mp4 goes to the blob store from here:
neither passes through the job runner.
"""

from __future__ import annotations

import asyncio
import heapq
import io
import itertools
import queue
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
from PIL import Image
from ray import serve

from api.config import DeploymentResources
from deployments import init_replica
from deployments.media import encode_mp4, encode_png
from deployments.store.blobs import BlobStore
from engine.policies import make_policy
from engine.step_cost import SMOOTHING
from models import load_adapter
from models.interface import Condition
from models.spec import ModelSpec


class InputImageMissing(RuntimeError):
    """An image-to-video job's stored input image is gone (deleted, or a blob store the decoder cannot see)."""


@dataclass(frozen=True)
class DecodeRequest:
    """One decode; its latents travel beside it (an object reference across processes)."""

    model: str
    latent_elements: int  # the latents' element count: the decode's size (SRPTF's decode order, the backlog)
    media: Literal["mp4", "png"]
    fps: int = 8
    arrival_time: float = 0.0  # when the job entered the step scheduler's pool: FIFO's decode order
    blob_name: str | None = None  # store the media under this name in the blob store and answer its path


@dataclass(frozen=True)
class ImageEncodeRequest:
    """An image-to-video request's input image (checked bytes the ingress stored in the blob store, read from there
    by the decoder) at the request's size; its seed draws the latents."""

    model: str
    image_blob: str
    height: int
    width: int
    num_frames: int
    seed: int


@dataclass(frozen=True)
class Decoded:
    """The media (its bytes, or its blob path when the request named one) and the decode stage's seconds: waiting in
    the queue, VAE decode, mp4/png encoding (and storing)."""

    media: bytes | None
    blob: str | None
    queue_s: float
    decode_s: float
    mux_s: float


class VaeDecoderCore:
    """`copies` independent sets of the VAEs, one per decode that may run at once: diffusers' causal video VAEs
    keep the decode's conv cache on the module (Wan's `_feat_map`, CogVideoX's conv caches), so two decodes on one
    module in two threads corrupt each other (measured: a shape error, and different bytes)."""

    def __init__(self, models: list[ModelSpec], device: str = "cpu", copies: int = 1,
                 blobs: BlobStore | None = None) -> None:
        self.blobs = blobs
        self._free: queue.SimpleQueue[dict] = queue.SimpleQueue()
        for _ in range(copies):
            self._free.put({m.name: load_adapter(m, parts=("vae",), device=device) for m in models})

    def decode(self, request: DecodeRequest, latents: torch.Tensor) -> Decoded:
        """The media of one request's latents (1, *latent_shape), with its decode and mux seconds (queue_s 0).

        Requests are decoded one by one, never batched: the API promises the same bytes
        for the same seed alone or batched, and the VAE's 3D convolutions are not
        batch-invariant on CPU (oneDNN picks kernels by batch size: one level of 255
        apart was measured for batch 3 vs 1). Each request's latents are decoded exactly
        once, so batching could only save call overhead.
        """
        start = time.perf_counter()
        adapters = self._free.get()  # a set no other decode is using (as many sets as decodes run at once)
        try:
            video = adapters[request.model].decode(latents)[0]
        finally:
            self._free.put(adapters)
        decoded = time.perf_counter()
        media = encode_mp4(video, request.fps) if request.media == "mp4" else encode_png(video[0])
        blob = None
        if request.blob_name is not None:
            if self.blobs is None:
                raise RuntimeError("this decoder has no blob store to put the media in")
            blob, media = self.blobs.put(request.blob_name, media), None
        return Decoded(media, blob, 0.0, decoded - start, time.perf_counter() - decoded)

    def encode_image(self, request: ImageEncodeRequest) -> Condition:
        """The image's latents (`image_latents`), on a VAE set no decode is using (the encoders keep caches too)."""
        if self.blobs is None:
            raise RuntimeError("this decoder has no blob store to read the input image from")
        try:
            data = self.blobs.get(request.image_blob)
        except FileNotFoundError:
            raise InputImageMissing("the job's input image is missing from the blob store") from None
        image = Image.open(io.BytesIO(data)).convert("RGB")
        adapters = self._free.get()
        try:
            return adapters[request.model].encode_image(image, request.height, request.width, request.num_frames,
                                                        request.seed)
        finally:
            self._free.put(adapters)


class DecodeQueue:
    """Decodes in policy order, `concurrency` at a time, in worker threads (the event loop stays free)."""

    def __init__(self, core: VaeDecoderCore, policy: str, concurrency: int) -> None:
        self.core, self.policy, self.concurrency = core, make_policy(policy), concurrency
        self._heap: list[tuple[tuple, int, DecodeRequest, torch.Tensor, float, asyncio.Future]] = []
        self._order = itertools.count()  # ties in priority keep arrival order
        self._running = 0
        self._running_elements = 0
        self.seconds_per_element: float | None = None  # decode + mux, measured (exponential moving average)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def running(self) -> int:
        """Decodes in progress."""
        return self._running

    def backlog_seconds(self) -> float:
        """The queued and running decodes' expected seconds at the measured rate, over `concurrency` slots
        (0 before the first decode: nothing is known, nothing is refused for it)."""
        if self.seconds_per_element is None:
            return 0.0
        elements = self._running_elements + sum(entry[2].latent_elements for entry in self._heap)
        return elements * self.seconds_per_element / self.concurrency

    async def decode(self, request: DecodeRequest, latents: torch.Tensor) -> Decoded:
        priority = self.policy.decode_priority(request.arrival_time, float(request.latent_elements))
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._order), request, latents, time.perf_counter(), future))
        self._start_next()
        return await future

    def _start_next(self) -> None:
        while self._heap and self._running < self.concurrency:
            _, _, request, latents, queued, future = heapq.heappop(self._heap)
            if future.cancelled():
                continue
            self._running += 1
            self._running_elements += request.latent_elements
            asyncio.get_running_loop().create_task(self._run(request, latents, time.perf_counter() - queued, future))

    async def _run(self, request: DecodeRequest, latents: torch.Tensor, queue_s: float,
                   future: asyncio.Future) -> None:
        try:
            decoded = await asyncio.to_thread(self.core.decode, request, latents)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            self._measured((decoded.decode_s + decoded.mux_s) / request.latent_elements)
            if not future.done():
                future.set_result(replace(decoded, queue_s=queue_s))
        finally:
            self._running -= 1
            self._running_elements -= request.latent_elements
            self._start_next()

    def _measured(self, seconds_per_element: float) -> None:
        previous = self.seconds_per_element
        self.seconds_per_element = seconds_per_element if previous is None else (
            SMOOTHING * seconds_per_element + (1 - SMOOTHING) * previous)


@serve.deployment(max_ongoing_requests=1024)
class VaeDecoder:
    def __init__(self, models: list[ModelSpec], resources: DeploymentResources, blobs_url: str, policy: str = "fifo",
                 concurrency: int = 1) -> None:
        res = init_replica(resources)
        self.queue = DecodeQueue(VaeDecoderCore(models, device=res.device,
                                                copies=concurrency, blobs=BlobStore(blobs_url)), policy, concurrency)

    async def decode(self, request: DecodeRequest, latents: torch.Tensor) -> Decoded:
        """`latents` is the object reference the scheduler put, passed on by the job's driver: Ray resolves it here."""
        return await self.queue.decode(request, latents)

    async def encode_image(self, request: ImageEncodeRequest) -> Condition:
        """An image-to-video job's first stage (beside its prompt's encoding), on the next free VAE set."""
        return await asyncio.to_thread(self.queue.core.encode_image, request)

    async def load(self) -> dict:
        """Requests waiting for a decode slot, decodes running, the expected seconds of all admitted decodes (admission) and the
        measured decode + mux seconds per latent element (the simulator's app profile)."""
        return {"queued": len(self.queue), "decoding": self.queue.running, "backlog_seconds": self.queue.backlog_seconds(),
                "seconds_per_element": self.queue.seconds_per_element}
