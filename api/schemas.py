"""HTTP API schemas (OpenAI-style, like vLLM-Omni / SGLang diffusion serving).

Static ranges live here; limits that depend on the model (allowed resolutions,
frame counts, image sizes) are checked by `api.validation` against the
model's geometry, so every error names the field and the allowed values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.spec import AspectRatio, ResolutionName
from models.step_cache import StepCache

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]

MAX_STEPS = 200


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Served model id; default: the first model of its kind.")
    prompt: str = Field(min_length=1, description="What to generate (1..max_prompt_chars characters).")
    negative_prompt: str | None = Field(default=None, description="Used with guidance_scale > 1.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    guidance_scale_2: float | None = Field(
        default=None, ge=0.0, le=50.0,
        description="Two-expert models only (Wan 2.2 A14B): guidance of the low-noise expert; default: the model's.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    cache: StepCache | None = Field(
        default=None, description="Step cache: {\"mode\": \"none\" | \"taylorseer\" | \"magcache\" | "
        "\"first_block\" | \"teacache\", ...}. taylorseer (\"interval\": 1-20, \"warmup_steps\": 1-200) runs "
        "the transformer on the first warmup_steps steps (default 3) and then one step in every interval (default "
        "5), the others extrapolated from them. The block-level modes run on Wan with one transformer, CogVideoX and "
        "LTX: magcache (\"threshold\": (0, 1], \"max_skip_steps\": 1-20, \"retention_ratio\": [0, 1], "
        "\"mag_ratios\") skips the blocks while the model's calibrated magnitude ratios stay within threshold "
        "(defaults 0.06, 3, 0.2); "
        "first_block (\"threshold\": (0, 1], default 0.05) runs the first block and skips the others while its "
        "residual moved by at most threshold; teacache (\"threshold\" default 0.08, \"warmup_steps\" default 5, "
        "\"coefficients\") skips the blocks while the rescaled change of the timestep modulation, accumulated, "
        "stays under threshold. "
        "Default: the model's `cache`.")


class VideoGenerationRequest(_Request):
    resolution: ResolutionName | None = Field(default=None, description="Default: the model's first resolution.")
    aspect_ratio: AspectRatio = "16:9"
    num_frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=120)
    input_reference: str | None = Field(
        default=None, max_length=15_000_000,
        description="Image-to-video models (kind i2v) only, and required there: the first frame's image (PNG, JPEG "
        "or WebP, at most 10 MiB, sides 16-4096 px) as a base64 data URL (data:image/png;base64,...), or as a "
        "multipart/form-data file part of that name. It is resized to the request's resolution as the model's "
        "diffusers pipeline does; default model with an image: the first i2v model.")


class ImageGenerationRequest(_Request):
    n: int = Field(default=1, ge=1, le=4, description="Images to generate (seeds seed, seed+1, ...).")
    size: str = Field(default="256x256", pattern=r"^\d+x\d+$", description="WIDTHxHEIGHT in pixels.")
    response_format: Literal["b64_json"] = "b64_json"


class Progress(BaseModel):
    step: int
    total_steps: int


class VideoJob(BaseModel):
    id: str
    object: Literal["video"] = "video"
    status: JobStatus
    progress: Progress
    model: str
    prompt: str
    resolution: ResolutionName
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    restarts: int = Field(default=0, description="Times the job was re-admitted after the process driving it died.")
    stages: dict[str, float] | None = Field(
        default=None, description="Completed jobs: seconds of each stage - encode_s (prompt, and the input image's "
        "VAE encode for image-to-video, concurrently), queue_s (in the pool before the first step), denoise_s, "
        "decode_queue_s (waiting for the VAE, in the policy's order), decode_s, mux_s (mp4 encoding).")
    computed_steps: int | None = Field(
        default=None, description="Completed jobs: denoising steps that ran the transformer; under a step cache "
        "(`cache`) the others were predicted from the steps that did.")
    estimated_start_seconds: float | None = Field(
        default=None, description="Queued jobs: the pool's remaining work over its measured drain rate (an upper "
        "bound on the wait under SRPTF, which may start a short job sooner).")


class VideoJobList(BaseModel):
    """A page of `GET /v1/videos`, newest first; pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[VideoJob]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ImageData(BaseModel):
    b64_json: str
    seed: int


class ImageGenerationResponse(BaseModel):
    created: int
    model: str
    data: list[ImageData]


class ModelCard(BaseModel):
    """A served model and exactly what it accepts (what this deployment renders, not what the family could)."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "dit-serve"
    family: str
    kind: Literal["t2v", "i2v", "t2i"] = Field(
        description="t2v: text-to-video; i2v: image-to-video (POST /v1/videos with input_reference); t2i: "
        "text-to-image (POST /v1/images/generations).")
    resolutions: dict[str, int] | None = Field(
        default=None, description="Video: accepted resolution names and the pixel height of their short side.")
    num_frames: list[int] | None = Field(default=None, description="Video: accepted frame counts.")
    aspect_ratios: list[str] | None = Field(default=None, description="Video: accepted aspect ratios.")
    max_image_side: int | None = Field(default=None, description="Image: largest width/height in pixels.")
    size_multiple: int = Field(description="Width and height are multiples of this many pixels.")
    default_steps: int
    experts: int = Field(description="Transformers sharing the denoising: 2 for Wan 2.2 A14B (guidance_scale_2 "
                                     "applies), else 1.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
