"""Model-dependent request validation: resolves defaults and checks ranges.

Raises `InvalidRequest(param, message)`; the ingress turns it into HTTP 400 with an
OpenAI-style error body naming the field and the allowed values.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.schemas import MAX_STEPS, ImageGenerationRequest, VideoGenerationRequest
from engine.request import GenerationSpec
from models.interface import Geometry
from models.spec import ModelSpec
from models.step_cache import StepCache

if TYPE_CHECKING:  # only the type: importing models.base loads diffusers
    from models.base import DiffusionAdapter

_ASPECTS = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2)}


class InvalidRequest(ValueError):
    def __init__(self, param: str, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.status_code = status_code

    def __reduce__(self):  # rebuilt from its three fields where Ray hands it to a caller in another process
        return type(self), (self.param, self.message, self.status_code)


@dataclass(frozen=True)
class ServedModel:
    spec: ModelSpec
    geometry: Geometry
    experts: int
    """Transformers sharing the denoising (2 for Wan 2.2 A14B)."""

    image_to_video: bool
    """Every request of the model brings an input image (`input_reference`)."""
    min_steps: int
    """Fewest denoising steps its schedule can make."""
    cache_modes: tuple[str, ...]
    """Step-cache modes the model runs."""

    @classmethod
    def of(cls, adapter: DiffusionAdapter) -> "ServedModel":
        """What the API needs of a model; `adapter` may hold no weights (parts=()). A default step cache the model
        cannot run is a config error."""
        served = cls(adapter.spec, adapter.geometry, adapter.expert_count, adapter.image_to_video, adapter.min_steps,
                     adapter.cache_modes)
        try:
            served.step_cache(adapter.spec.cache)
        except InvalidRequest as exc:
            raise ValueError(f"model {adapter.spec.name}: its default cache: {exc}") from None
        return served

    def step_cache(self, cache: StepCache) -> StepCache:
        """`cache` as this model runs it: a mode it supports, magcache with its ratios and teacache with its
        coefficients (the request's own, else the model's calibrated `mag_ratios` / `teacache_coefficients`)."""
        if cache.mode not in self.cache_modes:
            raise InvalidRequest("cache.mode", f"cache mode {cache.mode!r} is not supported for {self.spec.name}; "
                                               f"supported: {', '.join(self.cache_modes)}")
        if cache.mode == "magcache" and cache.mag_ratios is None:
            if self.spec.mag_ratios is None:
                raise InvalidRequest("cache.mag_ratios", f"{self.spec.name} has no calibrated MagCache ratios: pass "
                                     "cache.mag_ratios (2-1000 values in (0, 100)) or calibrate the model "
                                     "(python -m api.cache_calibration --mode magcache) and set its mag_ratios")
            cache = cache.model_copy(update={"mag_ratios": self.spec.mag_ratios})
        if cache.mode == "teacache" and cache.coefficients is None:
            if self.spec.teacache_coefficients is None:
                raise InvalidRequest("cache.coefficients", f"{self.spec.name} has no calibrated TeaCache "
                                     "coefficients: pass cache.coefficients (2-8 finite values, highest power first) "
                                     "or calibrate the model (python -m api.cache_calibration --mode teacache) and "
                                     "set its teacache_coefficients")
            cache = cache.model_copy(update={"coefficients": self.spec.teacache_coefficients})
        return cache

    @property
    def media(self) -> str:
        """The route that serves it: video (/v1/videos) or image (/v1/images/generations)."""
        return "video" if self.geometry.is_video else "image"

    @property
    def kind(self) -> str:
        """t2v, i2v or t2i, as GET /v1/models lists it."""
        return "t2i" if not self.geometry.is_video else "i2v" if self.image_to_video else "t2v"

    @property
    def frame_counts(self) -> list[int]:
        """Every frame count a video request may ask for (1 + k x the model's frame multiple, in range)."""
        return [f for f in range(self.spec.min_frames, self.spec.max_frames + 1) if self.geometry.frames_allowed(f)]


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def video_size(spec: ModelSpec, geometry: Geometry, resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width): the short side is the resolution's height; both rounded to the pixel multiple."""
    short = spec.resolution_heights[resolution]  # type: ignore[index]
    w, h = _ASPECTS[aspect_ratio]
    long = short * max(w, h) / min(w, h)
    height, width = (short, long) if w >= h else (long, short)
    m = geometry.pixel_multiple
    return _round_to(height, m), _round_to(width, m)


class RequestValidator:
    def __init__(self, models: dict[str, ServedModel], max_prompt_chars: int) -> None:
        self.models = models
        self.max_prompt_chars = max_prompt_chars

    def _model(self, name: str | None, media: str, image_to_video: bool = False) -> ServedModel:
        """The named model of this route, or its first model of the request's kind (i2v when it brings an image)."""
        of_media = [m for m in self.models.values() if m.media == media]
        if name is None:
            of_kind = [m for m in of_media if m.image_to_video == image_to_video]
            if not of_kind:
                what = "image-to-video" if image_to_video else f"text-to-{media}"
                raise InvalidRequest("model", f"no {what} model is served")
            return of_kind[0]
        if name not in self.models or self.models[name].media != media:
            allowed = ", ".join(m.spec.name for m in of_media) or "none"
            raise InvalidRequest("model", f"unknown {media} model {name!r}; allowed: {allowed}", status_code=404)
        return self.models[name]

    def _input_image(self, served: ServedModel, input_image: str | None) -> None:
        """An image-to-video model needs its input image; a text-only model refuses one."""
        if served.image_to_video and input_image is None:
            raise InvalidRequest("input_reference", f"{served.spec.name} is an image-to-video model: "
                                                    "input_reference (the first frame's image) is required")
        if not served.image_to_video and input_image is not None:
            i2v = ", ".join(m.spec.name for m in self.models.values() if m.image_to_video) or "none served"
            raise InvalidRequest("input_reference", f"{served.spec.name} is a text-only model and takes no "
                                                    f"input_reference; image-to-video models: {i2v}")

    def _common(self, request: VideoGenerationRequest | ImageGenerationRequest, served: ServedModel) -> dict:
        spec = served.spec
        if len(request.prompt) > self.max_prompt_chars:
            raise InvalidRequest("prompt", f"prompt has {len(request.prompt)} characters; allowed 1..{self.max_prompt_chars}")
        if not request.prompt.strip():
            raise InvalidRequest("prompt", "prompt must contain non-whitespace text")
        steps = request.num_inference_steps or spec.default_steps
        if steps < served.min_steps:
            raise InvalidRequest("num_inference_steps", f"num_inference_steps={steps}; {spec.name}'s schedule needs "
                                                        f"{served.min_steps}..{MAX_STEPS}")
        guidance = spec.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        guidance_2 = self._second_guidance(request, served, guidance)
        negative = request.negative_prompt if request.negative_prompt is not None else spec.default_negative_prompt
        if negative is not None and len(negative) > self.max_prompt_chars:
            raise InvalidRequest("negative_prompt", f"negative_prompt longer than {self.max_prompt_chars} characters")
        return dict(
            cache=self._cache(request.cache, served),
            model=spec.name,
            prompt=request.prompt,
            negative_prompt=negative if max(guidance, guidance_2 or 0.0) > 1.0 else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_scale_2=guidance_2,
            seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
        )

    @staticmethod
    def _cache(cache: StepCache | None, served: ServedModel) -> StepCache:
        """The request's step cache, or its model's default, as the model runs it; a mode it does not run is refused
        by name."""
        return served.step_cache(served.spec.cache if cache is None else cache)

    @staticmethod
    def _second_guidance(request: VideoGenerationRequest | ImageGenerationRequest, served: ServedModel,
                         guidance: float) -> float | None:
        """The low-noise expert's scale of a two-expert model, as WanPipeline defaults it; refused for others."""
        if served.experts == 1:
            if request.guidance_scale_2 is not None:
                raise InvalidRequest("guidance_scale_2", f"{served.spec.name} has one expert; guidance_scale_2 "
                                                         "applies to two-expert models only")
            return None
        if request.guidance_scale_2 is not None:
            return request.guidance_scale_2
        return guidance if served.spec.default_guidance_scale_2 is None else served.spec.default_guidance_scale_2

    def video_resolution(self, request: VideoGenerationRequest, input_image: str | None = None) -> str:
        """The resolution the request renders at: its own, or its model's first listed one when it names none."""
        spec = self._model(request.model, "video", input_image is not None).spec
        resolution = request.resolution or next(iter(spec.resolution_heights))
        if resolution not in spec.resolution_heights:
            raise InvalidRequest("resolution", f"resolution {resolution!r} not served by {spec.name}; "
                                               f"allowed: {', '.join(spec.resolution_heights)}")
        return resolution

    def video(self, request: VideoGenerationRequest, input_image: str | None = None) -> GenerationSpec:
        """The validated spec of a video request; `input_image` is the digest of its checked input image, if any."""
        served = self._model(request.model, "video", input_image is not None)
        self._input_image(served, input_image)
        spec, geometry = served.spec, served.geometry
        resolution = self.video_resolution(request, input_image)
        if spec.aspect_ratios is not None and request.aspect_ratio not in spec.aspect_ratios:
            raise InvalidRequest("aspect_ratio", f"aspect_ratio {request.aspect_ratio!r} not served by {spec.name}; "
                                                 f"allowed: {', '.join(spec.aspect_ratios)}")
        frames = request.num_frames or spec.default_frames
        t = geometry.frame_multiple
        if not (spec.min_frames <= frames <= spec.max_frames and geometry.frames_allowed(frames)):
            raise InvalidRequest("num_frames", f"num_frames={frames} not allowed for {spec.name}: must be 1 + {t}k "
                                               f"in [{spec.min_frames}, {spec.max_frames}], i.e. one of "
                                               f"{served.frame_counts}")
        height, width = video_size(spec, geometry, resolution, request.aspect_ratio)
        return GenerationSpec(height=height, width=width, num_frames=frames, fps=request.fps or spec.default_fps,
                              input_image=input_image, **self._common(request, served))

    def image(self, request: ImageGenerationRequest) -> GenerationSpec:
        served = self._model(request.model, "image")
        spec, m = served.spec, served.geometry.pixel_multiple
        width, height = (int(v) for v in request.size.split("x"))
        if not all(m <= v <= spec.max_image_side and v % m == 0 for v in (width, height)):
            raise InvalidRequest("size", f"size {request.size!r} not allowed for {spec.name}: WIDTHxHEIGHT with each "
                                         f"side a multiple of {m} in [{m}, {spec.max_image_side}]")
        return GenerationSpec(height=height, width=width, num_frames=1, fps=1, **self._common(request, served))

    def probe_specs(self, name: str) -> list[GenerationSpec]:
        """The smallest and the largest request `name` accepts by default (frames, steps, guidance): what the step
        scheduler times at start-up to seed its step-cost model."""
        served = self.models[name]
        if served.media == "video":
            heights = served.spec.resolution_heights
            ends = sorted({min(heights, key=heights.get), max(heights, key=heights.get)}, key=heights.get)
            image = "probe" if served.image_to_video else None  # the probe runs placeholder image latents
            return [self.video(VideoGenerationRequest(model=name, prompt="probe", resolution=r, seed=0), image)
                    for r in ends]
        m = served.geometry.pixel_multiple
        sides = sorted({max(m, 256 // m * m), served.spec.max_image_side // m * m})
        return [self.image(ImageGenerationRequest(model=name, prompt="probe", size=f"{s}x{s}", seed=0)) for s in sides]
