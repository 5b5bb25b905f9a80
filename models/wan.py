"""Wan 2.1 and 2.2 (Wan-AI/Wan2.x-*-Diffusers): text-to-video and image-to-video through diffusers' Wan pipeline
pieces."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from models import wan_packed
from models.base import DiffusionAdapter
from models.interface import Condition, EncodedPrompt, Geometry, Part, split_rows
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

    Image-to-video checkpoints (the transformer takes the noisy latents plus `scale_factor_temporal` mask
    channels and the VAE latents of [image, black frames]) are `WanImageToVideoPipeline`'s loop: that condition
    is concatenated to every row's latents on the channel axis. Wan 2.1 I2V also attends to the image's CLIP
    tokens (`image_encoder`, loaded with the VAE: both encode the input image once); Wan2.2-I2V-A14B has no
    image encoder. TI2V-5B runs both pipelines from one checkpoint; an `image_input` entry serves it as
    `WanImageToVideoPipeline` with `expand_timesteps`: the image's latents (the VAE's mode) are the first latent
    frame, kept by every step, and its tokens are modulated at timestep 0.
    """

    family = "wan"
    packed_module = wan_packed
    pipeline_cls = WanPipeline
    transformer_cls = WanTransformer3DModel
    vae_cls = AutoencoderKLWan
    text_components = ("tokenizer", "text_encoder")
    tiny_variants = ("default", "wan2.2-a14b", "wan2.2-ti2v-5b", "wan2.2-i2v-a14b", "wan2.1-i2v")
    IMAGE_COMPONENTS = ("image_encoder", "image_processor")
    """Wan 2.1 I2V's CLIP image encoder: it encodes the input image where the VAE does."""
    CLIP_TOKENS = 257
    """CLIP ViT-H/14's 256 patches and class token, what Wan 2.1 I2V attends to: the step-cost probe's placeholder."""

    def __init__(self, spec: ModelSpec, parts=("text", "transformer", "vae")) -> None:
        # A checkpoint with a CLIP image encoder needs WanImageToVideoPipeline to load it; every other Wan one loads
        # as WanPipeline (whose prompt encoding is the same).
        self.pipeline_cls = WanImageToVideoPipeline if self._clip_conditioned(spec) else WanPipeline
        super().__init__(spec, parts)

    @staticmethod
    def _clip_conditioned(spec: ModelSpec) -> bool:
        if spec.source == "tiny":
            return spec.tiny_variant == "wan2.1-i2v"
        return WanTransformer3DModel.load_config(spec.source, subfolder="transformer").get("image_dim") is not None

    def optional_component_names(self) -> set[str]:
        image = set(self.IMAGE_COMPONENTS) if self.pipeline_cls is WanImageToVideoPipeline else set()
        return super().optional_component_names() | {"transformer_2"} | image

    def _load_pretrained(self, spec: ModelSpec) -> WanPipeline:  # type: ignore[override]
        pipeline = super()._load_pretrained(spec)
        if "transformer" in self.parts and pipeline.config.get("boundary_ratio") is not None:
            if pipeline.transformer is None or pipeline.transformer_2 is None:
                raise ValueError(f"{spec.source}: boundary_ratio is set but the checkpoint lacks "
                                 "transformer or transformer_2 (both experts are served)")
        return pipeline

    def _skipped_when_loading(self, wanted: set[str]) -> set[str]:
        """transformer_2 travels with transformer (a two-expert checkpoint needs both on the runner), the CLIP image
        encoder with the VAE."""
        kept = ({"transformer_2"} if "transformer" in wanted else set()) | (
            set(self.IMAGE_COMPONENTS) if "vae" in wanted else set())
        return super()._skipped_when_loading(wanted) - kept

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        ti2v, clip = spec.tiny_variant == "wan2.2-ti2v-5b", spec.tiny_variant == "wan2.1-i2v"
        i2v = clip or spec.tiny_variant == "wan2.2-i2v-a14b"
        channels = 48 if ti2v else 16
        in_channels = 2 * channels + 4 if i2v else channels  # I2V: noise + 4 mask channels + condition latents
        # Wan 2.1 I2V: CLIP image tokens (32 wide here, 1280 in the 14B) projected to the inner width, own K/V.
        image = dict(image_dim=32, added_kv_proj_dim=24) if clip else {}
        vae = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                   temperal_downsample=[False, True, True])
        if ti2v:  # Wan 2.2's residual VAE: 2x2 pixel patches in, 48 latent channels, 16x spatial compression
            vae = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                       temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                       patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                       latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        return {
            "transformer": dict(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
                out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, **image,
            ),
            "vae": vae,
            "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=3.0),
            # Wan2.2-T2V-A14B's model_index.json switches experts at 0.875 of the training timesteps, I2V at 0.9.
            "pipeline": {"wan2.2-a14b": {"boundary_ratio": 0.875}, "wan2.2-i2v-a14b": {"boundary_ratio": 0.9},
                         "wan2.2-ti2v-5b": {"expand_timesteps": True}}.get(spec.tiny_variant, {}),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            config = UMT5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": UMT5EncoderModel(config).eval()}
        if part == "vae" and configs["transformer"].get("image_dim") is not None:
            clip = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8)
            return {"vae": AutoencoderKLWan(**configs["vae"]).eval(), "image_encoder": CLIPVisionModel(clip).eval(),
                    "image_processor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})}
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

    @property
    def runs_both_pipelines(self) -> bool:
        return bool(self.pipeline.config.get("expand_timesteps"))

    @property
    def image_to_video(self) -> bool:
        return self.image_first_frame or self.transformer_config["in_channels"] != self.transformer_config["out_channels"]

    @torch.no_grad()
    def image_latents(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """As `WanImageToVideoPipeline.prepare_latents`: the VAE's mean latents of [image, black frames], normalised,
        after the mask channels (1 on the image's frame); TI2V-5B (`expand_timesteps`) encodes the image alone, its
        one latent frame. Deterministic (the posterior's mode), so `seed` is unused."""
        vae, g = self.pipeline.vae, self.geometry
        pixels = VideoProcessor(vae_scale_factor=g.spatial_factor).preprocess(image, height, width).unsqueeze(2)
        frames = 0 if self.image_first_frame else num_frames - 1
        video = torch.cat([pixels, pixels.new_zeros(1, 3, frames, height, width)], dim=2)
        latents = retrieve_latents(vae.encode(video.to(self.device, vae.dtype)), sample_mode="argmax").float()
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents)
        latents = (latents - mean) * inverse_std
        if self.image_first_frame:
            return {"image_latents": latents.to(self.dtype).cpu()}  # (1, C, 1, H, W)
        mask = torch.zeros(1, g.temporal_factor, latents.shape[2], *latents.shape[3:], dtype=latents.dtype,
                           device=latents.device)
        mask[:, :, 0] = 1  # the first latent frame holds the image (its temporal_factor mask copies, as the pipeline)
        cond = {"image_latents": torch.cat([mask, latents], dim=1).to(self.dtype).cpu()}
        if self.transformer_config.get("image_dim") is not None:  # Wan 2.1 I2V: the CLIP tokens of the image as given
            clip = self.pipeline.image_encoder
            inputs = self.pipeline.image_processor(images=image, return_tensors="pt").to(self.device)
            tokens = clip(**inputs, output_hidden_states=True).hidden_states[-2]
            cond["image_embeds"] = tokens.to(self.dtype).cpu()
        return cond

    def image_placeholder(self, latent_shape: tuple[int, ...]) -> Condition:
        if not self.image_to_video:
            return {}
        if self.image_first_frame:
            return {"image_latents": torch.zeros(1, latent_shape[0], 1, *latent_shape[2:], dtype=self.dtype)}
        channels = self.transformer_config["in_channels"] - latent_shape[0]
        cond = {"image_latents": torch.zeros(1, channels, *latent_shape[1:], dtype=self.dtype)}
        if (width := self.transformer_config.get("image_dim")) is not None:
            cond["image_embeds"] = torch.zeros(1, self.CLIP_TOKENS, width, dtype=self.dtype)
        return cond

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        g = self.geometry
        return (self.transformer_config["out_channels"], g.latent_frames(num_frames),
                height // g.spatial_factor, width // g.spatial_factor)

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        """Video tokens only: Wan's text enters through cross-attention."""
        _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.transformer_config["patch_size"]
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        """Image-to-video: mask + condition latents as extra channels, or (TI2V-5B) the first frame's tokens clean."""
        clean = 0
        if self.image_first_frame:
            clean = self.row_tokens((0, 1, *latents.shape[2:]), cond)
        elif "image_latents" in cond:
            latents = torch.cat([latents, cond["image_latents"][0].to(latents.dtype)])
        image = cond["image_embeds"][0] if "image_embeds" in cond else None
        return PackedRequest(latents, timestep, cond["encoder_hidden_states"][0], image=image, clean_tokens=clean)

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        view = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(view).to(latents)
        std = torch.tensor(config.latents_std).view(view).to(latents)
        return self.pipeline.vae.decode(latents * std + mean, return_dict=False)[0]
