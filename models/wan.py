"""Wan 2.1 text-to-video (Wan-AI/Wan2.1-T2V-*-Diffusers) through diffusers' Wan pipeline pieces."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from models import wan_packed
from models.base import Condition, DiffusionAdapter, EncodedPrompt, Geometry, Part, split_rows
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer


class WanAdapter(DiffusionAdapter):
    """Latents are (C, F, H, W) per request. Wan 2.2's two-expert checkpoints are refused at load."""

    family = "wan"
    packed_module = wan_packed
    pipeline_cls = WanPipeline
    transformer_cls = WanTransformer3DModel
    vae_cls = AutoencoderKLWan
    text_components = ("tokenizer", "text_encoder")

    def optional_component_names(self) -> set[str]:
        return super().optional_component_names() | {"transformer_2"}

    def _load_pretrained(self, spec: ModelSpec):  # type: ignore[override]
        pipeline = super()._load_pretrained(spec)
        if pipeline.config.get("boundary_ratio") is not None or pipeline.config.get("expand_timesteps"):
            raise ValueError(f"{spec.source}: Wan 2.2 (two experts / expanded timesteps) is not supported yet")
        return pipeline

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        return {
            "transformer": dict(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
            ),
            "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                        temperal_downsample=[False, True, True]),
            "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=3.0),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            config = UMT5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": UMT5EncoderModel(config).eval()}
        if part == "transformer":
            return {"transformer": WanTransformer3DModel(**configs["transformer"]).eval()}
        return {"vae": AutoencoderKLWan(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        v = self.vae_config
        patch_t, patch, _ = self.transformer_config["patch_size"]
        return Geometry(spatial_factor=2 ** len(v["temperal_downsample"]),
                        temporal_factor=2 ** sum(v["temperal_downsample"]), patch_size=patch, patch_size_t=patch_t,
                        text_tokens=self.spec.max_sequence_length, is_video=True)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        pos, neg = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=[n or "" for n in negative_prompts], do_classifier_free_guidance=True,
            max_sequence_length=self.spec.max_sequence_length, device=self.device, dtype=self.dtype,
        )
        return split_rows(negative_prompts, {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg})

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        g = self.geometry
        return (self.transformer_config["in_channels"], g.latent_frames(num_frames),
                height // g.spatial_factor, width // g.spatial_factor)

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        """Video tokens only: Wan's text enters through cross-attention."""
        _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.transformer_config["patch_size"]
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        return PackedRequest(latents, timestep, cond["encoder_hidden_states"][0])

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(latents)
        std = torch.tensor(config.latents_std).view(view).to(latents)
        return self.pipeline.vae.decode(latents * std + mean, return_dict=False)[0]
