"""Stable Diffusion 3 / 3.5 (image) through diffusers' SD3 pipeline pieces."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

from models import sd3_packed
from models.base import DiffusionAdapter
from models.cogvideox import tiny_t5_config
from models.interface import Condition, EncodedPrompt, Geometry, Part, split_rows
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

_CLIP_TOKENS = 77  # SD3 always encodes 77 CLIP tokens in front of the T5 tokens


class SD3Adapter(DiffusionAdapter):
    """Latents are (C, H, W) per request; the condition adds CLIP's pooled projection."""

    family = "sd3"
    packed_module = sd3_packed
    pipeline_cls = StableDiffusion3Pipeline
    transformer_cls = SD3Transformer2DModel
    vae_cls = AutoencoderKL
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")

    def optional_component_names(self) -> set[str]:
        return super().optional_component_names() | {"image_encoder", "feature_extractor"}

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        return {
            "transformer": dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=32, out_channels=4),
            "vae": dict(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, sample_size=32, shift_factor=0.0609,
                        scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            clip = CLIPTextConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                                  num_attention_heads=2, num_hidden_layers=3, projection_dim=16, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=1, max_position_embeddings=_CLIP_TOKENS)
            tokenizer = build_tiny_tokenizer(model_max_length=_CLIP_TOKENS)
            return {"tokenizer": tokenizer, "text_encoder": CLIPTextModelWithProjection(clip).eval(),
                    "tokenizer_2": tokenizer, "text_encoder_2": CLIPTextModelWithProjection(clip).eval(),
                    "tokenizer_3": tokenizer, "text_encoder_3": T5EncoderModel(tiny_t5_config()).eval()}
        if part == "transformer":
            return {"transformer": SD3Transformer2DModel(**configs["transformer"]).eval()}
        return {"vae": AutoencoderKL(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        return Geometry(spatial_factor=2 ** (len(self.vae_config["block_out_channels"]) - 1), temporal_factor=1,
                        patch_size=self.transformer_config["patch_size"], patch_size_t=1,
                        text_tokens=_CLIP_TOKENS + self.spec.max_sequence_length, is_video=False)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        pos, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=[n or "" for n in negative_prompts],
            do_classifier_free_guidance=True, max_sequence_length=self.spec.max_sequence_length, device=self.device,
        )
        return split_rows(negative_prompts, {"encoder_hidden_states": pos, "pooled_projections": pooled},
                          {"encoder_hidden_states": neg, "pooled_projections": neg_pooled})

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        f = self.geometry.spatial_factor
        return (self.transformer_config["in_channels"], height // f, width // f)

    def set_timesteps(self, sampler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        config = sampler.config
        if not config.get("use_dynamic_shifting"):
            sampler.set_timesteps(num_steps, device="cpu")
            return
        patch = self.transformer_config["patch_size"]
        image_seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        sampler.set_timesteps(num_steps, device="cpu", mu=mu)

    @property
    def shardable(self) -> bool:
        """SD3.5's dual-attention blocks add an image-only attention that has no Brick plan of its own yet."""
        return not self.transformer_config.get("dual_attention_layers")

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        _, height, width = latent_shape
        p = self.transformer_config["patch_size"]
        return (height // p) * (width // p) + cond["encoder_hidden_states"].shape[1]

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        return PackedRequest(latents, timestep, cond["encoder_hidden_states"][0],
                             pooled=cond["pooled_projections"][0])

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        return self.pipeline.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
