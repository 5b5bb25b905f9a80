"""Mochi 1 (genmo/mochi-1-preview) through diffusers' Mochi pipeline pieces."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule
from transformers import T5EncoderModel

from models import mochi_packed
from models.base import DiffusionAdapter
from models.cogvideox import tiny_t5_config
from models.interface import Condition, EncodedPrompt, Geometry, Part, split_rows
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import build_tiny_tokenizer

# Mochi's pipeline hard-codes its VAE's compression (8x spatial, 6x temporal) and sigma schedule.
_SPATIAL, _TEMPORAL, _THRESHOLD_NOISE = 8, 6, 0.025


class MochiAdapter(DiffusionAdapter):
    """Latents are (C, F, H, W) per request; text rows carry an attention mask."""

    family = "mochi"
    min_steps = 2  # MochiPipeline's linear-quadratic schedule divides by its linear half (num_steps // 2)
    packed_module = mochi_packed
    pipeline_cls = MochiPipeline
    transformer_cls = MochiTransformer3DModel
    vae_cls = AutoencoderKLMochi
    text_components = ("tokenizer", "text_encoder")

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        return {
            "transformer": dict(
                patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
                activation_fn="swiglu", max_sequence_length=spec.max_sequence_length,
            ),
            "vae": dict(
                latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
            ),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": T5EncoderModel(tiny_t5_config()).eval()}
        if part == "transformer":
            return {"transformer": MochiTransformer3DModel(**configs["transformer"]).eval()}
        return {"vae": AutoencoderKLMochi(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        return Geometry(spatial_factor=_SPATIAL, temporal_factor=_TEMPORAL,
                        patch_size=self.transformer_config["patch_size"], patch_size_t=1,
                        text_tokens=self.spec.max_sequence_length, is_video=True)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        pos, pos_mask, neg, neg_mask = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=[n or "" for n in negative_prompts], do_classifier_free_guidance=True,
            max_sequence_length=self.spec.max_sequence_length, device=self.device, dtype=self.dtype,
        )
        return split_rows(negative_prompts,
                          {"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask},
                          {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask})

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        channels = self.transformer_config["in_channels"]
        return (channels, self.geometry.latent_frames(num_frames), height // _SPATIAL, width // _SPATIAL)

    def set_timesteps(self, sampler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        sigmas = np.array(linear_quadratic_schedule(num_steps, _THRESHOLD_NOISE))
        sampler.set_timesteps(sigmas=sigmas, device="cpu")

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        _, frames, height, width = latent_shape
        p = self.transformer_config["patch_size"]
        return frames * (height // p) * (width // p) + int(cond["encoder_attention_mask"].sum())

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        """Only the unmasked text tokens: what Mochi's joint attention attends to."""
        valid = cond["encoder_attention_mask"][0].bool()
        return PackedRequest(latents, timestep.to(latents.dtype), cond["encoder_hidden_states"][0][valid])

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        if config.latents_mean is not None and config.latents_std is not None:
            view = (1, -1, 1, 1, 1)
            mean = torch.tensor(config.latents_mean).view(view).to(latents)
            std = torch.tensor(config.latents_std).view(view).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return self.pipeline.vae.decode(latents, return_dict=False)[0]
