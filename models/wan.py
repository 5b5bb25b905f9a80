"""Wan 2.1 and 2.2 text-to-video (Wan-AI/Wan2.x-*-Diffusers) through diffusers' Wan pipeline pieces."""

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
    """Latents are (C, F, H, W) per request.

    Wan 2.2 A14B checkpoints carry two experts (`transformer` for the high-noise steps,
    `transformer_2` below `boundary_ratio` x the training timesteps; diffusers' `WanPipeline`
    switches between them per step, each with its own guidance scale): both live on the
    runner and each packed step runs every row in its own expert. TI2V-5B sets
    `expand_timesteps` (one timestep per latent patch, all equal for text-to-video, so the
    packed forward's per-row timestep gives the same result) and a 4x16x16 VAE.
    """

    family = "wan"
    packed_module = wan_packed
    pipeline_cls = WanPipeline
    transformer_cls = WanTransformer3DModel
    vae_cls = AutoencoderKLWan
    text_components = ("tokenizer", "text_encoder")
    tiny_variants = ("default", "wan2.2-a14b", "wan2.2-ti2v-5b")

    def optional_component_names(self) -> set[str]:
        return super().optional_component_names() | {"transformer_2"}

    def _load_pretrained(self, spec: ModelSpec) -> WanPipeline:  # type: ignore[override]
        pipeline = super()._load_pretrained(spec)
        if "transformer" in self.parts and pipeline.config.get("boundary_ratio") is not None:
            if pipeline.transformer is None or pipeline.transformer_2 is None:
                raise ValueError(f"{spec.source}: boundary_ratio is set but the checkpoint lacks "
                                 "transformer or transformer_2 (both experts are served)")
        return pipeline

    def _skipped_when_loading(self, wanted: set[str]) -> set[str]:
        """transformer_2 travels with transformer: a two-expert checkpoint needs both on the runner."""
        return super()._skipped_when_loading(wanted) - ({"transformer_2"} if "transformer" in wanted else set())

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        ti2v = spec.tiny_variant == "wan2.2-ti2v-5b"
        channels = 48 if ti2v else 16
        vae = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                   temperal_downsample=[False, True, True])
        if ti2v:  # Wan 2.2's residual VAE: 2x2 pixel patches in, 48 latent channels, 16x spatial compression
            vae = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                       temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                       patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                       latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        return {
            "transformer": dict(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
                out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
            ),
            "vae": vae,
            "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=3.0),
            # Wan2.2-T2V-A14B's model_index.json switches experts at 0.875 of the training timesteps.
            "pipeline": {"wan2.2-a14b": {"boundary_ratio": 0.875},
                         "wan2.2-ti2v-5b": {"expand_timesteps": True}}.get(spec.tiny_variant, {}),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            config = UMT5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": UMT5EncoderModel(config).eval()}
        if part == "transformer":
            experts = 2 if configs["pipeline"].get("boundary_ratio") is not None else 1
            built = [WanTransformer3DModel(**configs["transformer"]).eval() for _ in range(experts)]
            return {"transformer": built[0], **({"transformer_2": built[1]} if experts == 2 else {})}
        return {"vae": AutoencoderKLWan(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        v = self.vae_config
        patch_t, patch, _ = self.transformer_config["patch_size"]
        return Geometry(spatial_factor=v.get("scale_factor_spatial") or 8,
                        temporal_factor=v.get("scale_factor_temporal") or 4, patch_size=patch, patch_size_t=patch_t,
                        text_tokens=self.spec.max_sequence_length, is_video=True)

    @property
    def boundary_timestep(self) -> float | None:
        """Timesteps at or above this run in `transformer`, below it in `transformer_2` (None: one expert)."""
        ratio = self.pipeline.config.get("boundary_ratio")
        return None if ratio is None else ratio * self.scheduler_config["num_train_timesteps"]

    @property
    def expert_count(self) -> int:
        return 1 if self.boundary_timestep is None else 2

    def expert_index(self, timestep: torch.Tensor | float) -> int:
        boundary = self.boundary_timestep
        return 0 if boundary is None or float(timestep) >= boundary else 1

    def expert(self, index: int) -> torch.nn.Module:
        return self.pipeline.transformer_2 if index == 1 else self.pipeline.transformer

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
