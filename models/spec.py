"""The typed description of one served diffusion model (what `models/` builds and the API accepts).

Validated once from the `models:` list of a Serve config and frozen: deployments
receive it and never mutate it (a changed knob means a redeploy).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.frozen import FrozenModel
from models.step_cache import StepCache

ModelFamily = Literal["cogvideox", "mochi", "wan", "sd3", "ltx", "hunyuanvideo15"]
ResolutionName = Literal["64p", "240p", "360p", "480p", "720p"]
"""Names of a video's short side; "64p" is what the CPU default's trained shapes model renders."""
AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4", "3:2"]
"""3:2 is CogVideoX-5b(-I2V)'s 720x480."""



class ModelSpec(FrozenModel):
    """One served diffusion model and the request range it accepts."""

    name: str = Field(description="Model id clients pass as `model` (and listed by GET /v1/models).")
    family: ModelFamily = Field(description="diffusers pipeline family that builds and runs the model.")
    source: str = Field(
        default="tiny",
        description="'tiny' builds random weights from a small config (no download); otherwise a local "
        "directory or hub id of a diffusers checkpoint, loaded with `from_pretrained`.",
    )
    weights_seed: int = Field(default=0, description="Seed of the tiny variant's random weights.")
    tiny_variant: str = Field(
        default="default",
        description="Which layout a 'tiny' source builds, where a family has several (Wan: 'wan2.1', "
        "'wan2.2-a14b' with two experts, 'wan2.2-ti2v-5b' with the 4x16x16 VAE); ignored for checkpoints.")
    image_input: bool = Field(
        default=False,
        description="Serve this entry as image-to-video (every request brings its first frame) where one checkpoint "
        "runs both pipelines (LTX-Video: `LTXImageToVideoPipeline`; Wan2.2-TI2V-5B: `WanImageToVideoPipeline` with "
        "`expand_timesteps`); checkpoints whose image-to-video is a checkpoint of its own (CogVideoX-5b-I2V, "
        "Wan I2V) are read as such from their config and refuse this flag.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    resolution_heights: dict[ResolutionName, int] = Field(
        default={"240p": 240, "360p": 360, "480p": 480, "720p": 720},
        description="Pixel height each resolution name renders at; the keys are the allowed names. "
        "The CPU config maps them to small heights so tiny models stay fast.",
    )
    aspect_ratios: list[AspectRatio] | None = Field(
        default=None, description="Video aspect ratios accepted (default: all); a model trained at one shape lists it.")
    max_image_side: int = Field(default=1024, ge=16, description="Largest width/height of an image request.")
    min_frames: int = Field(default=1, ge=1)
    max_frames: int = Field(default=49, ge=1, description="Most frames a video request may ask for.")
    default_frames: int = Field(default=9, ge=1)
    default_steps: int = Field(default=50, ge=1, le=200)
    default_guidance_scale: float = Field(default=6.0, ge=0.0, le=50.0)
    default_guidance_scale_2: float | None = Field(
        default=None, ge=0.0, le=50.0,
        description="Two-expert models: the low-noise expert's guidance (default: default_guidance_scale).")
    default_fps: int = Field(default=8, ge=1, le=120)
    default_negative_prompt: str = ""
    max_sequence_length: int = Field(
        default=226, ge=1, description="Text tokens fed to the transformer (longer prompts are truncated)."
    )
    cache: StepCache = Field(default=StepCache(), description="The step cache of requests that name none.")
    mag_ratios: tuple[float, ...] | None = Field(
        default=None, min_length=2, max_length=1000,
        description="MagCache's calibrated magnitude ratios of this checkpoint, one per step of the calibration run "
                    "(python -m api.cache_calibration --mode magcache prints them): the default of a magcache "
                    "request's mag_ratios.")
    teacache_coefficients: tuple[float, ...] | None = Field(
        default=None, min_length=2, max_length=8,
        description="TeaCache's rescaling polynomial of this checkpoint, highest power first (python -m "
                    "api.cache_calibration --mode teacache fits it; TeaCache's repository publishes Wan 2.1's): the "
                    "default of a teacache request's coefficients.")

    @model_validator(mode="after")
    def _check_cache(self) -> "ModelSpec":
        """The calibrations are checked as the requests that take them as defaults are (`StepCache`'s rules)."""
        if self.mag_ratios is not None:
            StepCache(mode="magcache", mag_ratios=self.mag_ratios)
        if self.teacache_coefficients is not None:
            StepCache(mode="teacache", coefficients=self.teacache_coefficients)
        return self

    @model_validator(mode="after")
    def _check_frames(self) -> "ModelSpec":
        if not self.min_frames <= self.default_frames <= self.max_frames:
            raise ValueError("default_frames must lie in [min_frames, max_frames]")
        return self
