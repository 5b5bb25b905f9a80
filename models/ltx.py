"""LTX-Video (Lightricks/LTX-Video 0.9.x) text- and image-to-video through diffusers' LTX pipeline pieces."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
from diffusers.pipelines.ltx.pipeline_ltx_image2video import retrieve_latents
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import T5EncoderModel

from models import ltx_packed
from models.base import DiffusionAdapter
from models.cogvideox import tiny_t5_config
from models.interface import Condition, EncodedPrompt, Geometry, Part, split_rows
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import build_tiny_tokenizer


class LTXAdapter(DiffusionAdapter):
    """Latents are (C, F, H, W) per request (LTXPipeline packs them into tokens for the transformer; the
    packed forward does the same per request, and the sampler's elementwise step does not care which layout).

    LTX conditions its RoPE on the video's frame rate, so each request's fps enters its rows as the
    `frame_rate` condition (`request_condition`); timesteps shift with each request's token count, as
    `LTXPipeline` shifts them.

    One LTX-Video checkpoint runs both pipelines; a model entry with `image_input` serves it as
    `LTXImageToVideoPipeline`: the input image's latents are the first latent frame of the request's
    initial latents, its tokens are modulated at timestep 0 in every forward, and the sampler steps only
    the frames after it.
    """

    family = "ltx"
    packed_module = ltx_packed
    pipeline_cls = LTXPipeline
    transformer_cls = LTXVideoTransformer3DModel
    vae_cls = AutoencoderKLLTXVideo
    text_components = ("tokenizer", "text_encoder")

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        return {
            "transformer": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                attention_head_dim=12, cross_attention_dim=24, num_layers=2, caption_channels=32),
            "vae": dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
                        decoder_spatio_temporal_scaling=(True, True, True, False),
                        decoder_inject_noise=(False,) * 5, patch_size=4, patch_size_t=1),
            # LTX-Video's scheduler config (resolution-dependent shift between 0.95 and 2.05).
            "scheduler": FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential"),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": T5EncoderModel(tiny_t5_config()).eval()}
        if part == "transformer":
            return {"transformer": LTXVideoTransformer3DModel(**configs["transformer"]).eval()}
        return {"vae": AutoencoderKLLTXVideo(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        v, t = self.vae_config, self.transformer_config
        scaling = 2 ** sum(v["spatio_temporal_scaling"])
        return Geometry(spatial_factor=v.get("spatial_compression_ratio") or v["patch_size"] * scaling,
                        temporal_factor=v.get("temporal_compression_ratio") or v["patch_size_t"] * scaling,
                        patch_size=t["patch_size"], patch_size_t=t["patch_size_t"],
                        text_tokens=self.spec.max_sequence_length, is_video=True)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        pos, pos_mask, neg, neg_mask = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=[n or "" for n in negative_prompts], do_classifier_free_guidance=True,
            max_sequence_length=self.spec.max_sequence_length, device=self.device, dtype=self.dtype,
        )
        return split_rows(negative_prompts, {"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask},
                          {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask})

    @property
    def runs_both_pipelines(self) -> bool:
        return True

    def request_condition(self, fps: int | None) -> Condition:
        return {"frame_rate": torch.tensor([[float(fps or self.spec.default_fps)]])}

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        g = self.geometry
        return (self.transformer_config["in_channels"], g.latent_frames(num_frames), height // g.spatial_factor,
                width // g.spatial_factor)

    def set_timesteps(self, sampler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        """LTXPipeline's schedule: sigmas 1 .. 1/n, shifted by the request's latent token count."""
        config = sampler.config
        _, frames, height, width = latent_shape
        mu = calculate_shift(frames * height * width, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")

    @torch.no_grad()
    def image_latents(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """As `LTXImageToVideoPipeline.prepare_latents`: resize, VAE-encode one frame, sample, normalise."""
        pixels = VideoProcessor(vae_scale_factor=self.geometry.spatial_factor).preprocess(image, height, width)
        vae = self.pipeline.vae
        encoded = vae.encode(pixels.to(self.device, self.dtype).unsqueeze(2))
        latents = retrieve_latents(encoded, torch.Generator("cpu").manual_seed(seed))
        latents = LTXImageToVideoPipeline._normalize_latents(latents, vae.latents_mean, vae.latents_std)
        return {"image_latents": latents.to(self.dtype).cpu()}  # (1, C, 1, H/32, W/32)

    def image_placeholder(self, latent_shape: tuple[int, ...]) -> Condition:
        if not self.image_first_frame:
            return {}
        channels, _, height, width = latent_shape
        return {"image_latents": torch.zeros(1, channels, 1, height, width, dtype=self.dtype)}

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        """Video tokens only: LTX's text enters through cross-attention."""
        _, frames, height, width = latent_shape
        t = self.transformer_config
        return (frames // t["patch_size_t"]) * (height // t["patch_size"]) * (width // t["patch_size"])

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        """Only the unmasked text tokens, the RoPE table of this shape at the row's frame rate (the runner adds
        it at admission; a row without one, e.g. from a benchmark's direct call, takes the model's default), and
        an image-to-video row's first-frame tokens as clean."""
        valid = cond["encoder_attention_mask"][0].bool()
        _, frames, height, width = latents.shape
        fps = float(cond["frame_rate"]) if "frame_rate" in cond else float(self.spec.default_fps)
        rotary = self._rotary(frames, height, width, fps)
        clean = self.row_tokens((0, 1, height, width), cond) if self.image_first_frame else 0
        return PackedRequest(latents, timestep, cond["encoder_hidden_states"][0][valid], rotary, clean_tokens=clean)

    @lru_cache(maxsize=64)
    def _rotary(self, frames: int, height: int, width: int, fps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's RoPE as LTXPipeline calls it: the latent grid, scales (temporal ratio / fps, spatial x2)."""
        g = self.geometry
        probe = torch.empty(1, frames * height * width, 1, device=self.device)
        cos, sin = self.transformer.rope(probe, frames, height, width,
                                         (g.temporal_factor / fps, g.spatial_factor, g.spatial_factor))
        return cos[0], sin[0]

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Denormalised as LTXPipeline does; a timestep-conditioned VAE (0.9.1+) decodes at the pipeline's default
        decode_timestep 0 (no noise added)."""
        vae = self.pipeline.vae
        view = (1, -1, 1, 1, 1)
        latents = (latents * vae.latents_std.view(view).to(latents) / vae.config.scaling_factor
                   + vae.latents_mean.view(view).to(latents))
        timestep = latents.new_zeros(len(latents)) if vae.config.timestep_conditioning else None
        return vae.decode(latents, timestep, return_dict=False)[0]
