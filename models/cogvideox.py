"""CogVideoX (THUDM/CogVideoX-2b/-5b, CogVideoX1.5-5B, CogVideoX-5b-I2V) through diffusers' CogVideoX pipeline
pieces."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import retrieve_latents
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import T5Config, T5EncoderModel

from models import cogvideox_packed
from models.base import DiffusionAdapter
from models.interface import Condition, EncodedPrompt, Geometry, Part, split_rows
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer


def tiny_t5_config() -> T5Config:
    return T5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


class CogVideoXAdapter(DiffusionAdapter):
    """Latents are (F, C, H, W) per request, as CogVideoX's transformer takes them.

    CogVideoX 1.5 patches pairs of latent frames (`patch_size_t` 2): as `CogVideoXPipeline` does, a request's
    odd latent frame count is padded by one noise frame, which the decode drops.

    Image-to-video checkpoints (CogVideoX-5b-I2V: the transformer takes twice the VAE's latent channels) are
    `CogVideoXImageToVideoPipeline`'s loop: the input image's latents (first frame; zeros after it) are
    concatenated to the noisy latents on the channel axis of every row at every step. CogVideoX1.5-5B-I2V adds
    its `ofs` embedding (the pipeline's constant offset, in the packed forward) and pads the latent frames to
    whole temporal patches as the text-to-video 1.5 does (the padding frame leads; the image latents stay on the
    first frame).
    """

    family = "cogvideox"
    packed_module = cogvideox_packed
    pipeline_cls = CogVideoXPipeline
    transformer_cls = CogVideoXTransformer3DModel
    vae_cls = AutoencoderKLCogVideoX
    text_components = ("tokenizer", "text_encoder")
    tiny_variants = ("default", "cogvideox1.5", "i2v", "cogvideox1.5-i2v")

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        # CogVideoX1.5-5B's transformer config: temporal patches of 2, no patch bias, and a sample size that bounds
        # its RoPE grid ("slice" RoPE covers at most sample_height/patch x sample_width/patch tokens: 64 x 64 here).
        v15 = dict(patch_size_t=2, patch_bias=False, sample_height=128, sample_width=128) \
            if spec.tiny_variant.startswith("cogvideox1.5") else {}
        if spec.tiny_variant == "cogvideox1.5-i2v":
            v15["ofs_embed_dim"] = 32  # CogVideoX1.5-5B-I2V: as wide as the time embedding it is added to
        # I2V: noisy latents + image latents (4 channels each)
        in_channels = 8 if spec.tiny_variant in ("i2v", "cogvideox1.5-i2v") else 4
        return {
            "transformer": dict(
                num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4,
                time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_frames=9, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=spec.max_sequence_length,
                use_rotary_positional_embeddings=True,
                **{"sample_width": 8, "sample_height": 8, **v15},
            ),
            "vae": dict(
                in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
            ),
            "scheduler": CogVideoXDDIMScheduler(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                timestep_spacing="trailing",
            ),
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            return {"tokenizer": build_tiny_tokenizer(), "text_encoder": T5EncoderModel(tiny_t5_config()).eval()}
        if part == "transformer":
            return {"transformer": CogVideoXTransformer3DModel(**configs["transformer"]).eval()}
        return {"vae": AutoencoderKLCogVideoX(**configs["vae"]).eval()}

    def make_geometry(self) -> Geometry:
        t = self.transformer_config
        if (t.get("patch_size_t") or 1) not in (1, 2):
            raise ValueError(f"{self.spec.source}: patch_size_t {t['patch_size_t']}; CogVideoX 1.5 patches 2 frames")
        temporal = self.vae_config["temporal_compression_ratio"]
        return Geometry(
            spatial_factor=2 ** (len(self.vae_config["block_out_channels"]) - 1),
            temporal_factor=temporal,
            patch_size=t["patch_size"],
            patch_size_t=t.get("patch_size_t") or 1,
            text_tokens=self.spec.max_sequence_length,
            is_video=True,
            # The VAE decodes latent frames in pairs: only an odd latent count gives 1 + 4k frames back.
            frame_step=2 * temporal,
        )

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        pos, neg = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=[n or "" for n in negative_prompts], do_classifier_free_guidance=True,
            max_sequence_length=self.spec.max_sequence_length, device=self.device, dtype=self.dtype,
        )
        return split_rows(negative_prompts, {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg})

    @property
    def image_to_video(self) -> bool:
        return self.transformer_config["in_channels"] == 2 * self.vae_config["latent_channels"]

    @torch.no_grad()
    def image_latents(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """As `CogVideoXImageToVideoPipeline.prepare_latents`: resize, VAE-encode one frame, sample, scale."""
        pixels = VideoProcessor(vae_scale_factor=self.geometry.spatial_factor).preprocess(image, height, width)
        vae = self.pipeline.vae
        encoded = vae.encode(pixels.to(self.device, self.dtype).unsqueeze(2))
        latents = retrieve_latents(encoded, torch.Generator("cpu").manual_seed(seed)).permute(0, 2, 1, 3, 4)
        scale = vae.config.scaling_factor
        latents = latents / scale if vae.config.invert_scale_latents else latents * scale
        return {"image_latents": latents.to(self.dtype).cpu()}  # (1, 1, C, H/8, W/8)

    def image_placeholder(self, latent_shape: tuple[int, ...]) -> Condition:
        if not self.image_to_video:
            return {}
        _, channels, height, width = latent_shape
        return {"image_latents": torch.zeros(1, 1, channels, height, width, dtype=self.dtype)}

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        g = self.geometry
        channels = self.transformer_config["in_channels"] // (2 if self.image_to_video else 1)
        frames = -(-g.latent_frames(num_frames) // g.patch_size_t) * g.patch_size_t  # 1.5: padded to whole patches
        return (frames, channels, height // g.spatial_factor, width // g.spatial_factor)

    def sampler_step(self, sampler: Any, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                     extra: dict[str, Any]) -> torch.Tensor:
        if not isinstance(sampler, CogVideoXDPMScheduler):
            return sampler.step(noise_pred, t, latents, return_dict=False)[0]
        # The DPM variant needs the previous step's x0 estimate and timestep: per-request state.
        latents, extra["old_pred_original_sample"] = sampler.step(
            noise_pred, extra.get("old_pred_original_sample"), t, extra.get("prev_timestep"), latents,
            return_dict=False,
        )
        extra["prev_timestep"] = t
        return latents

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        frames, _, height, width = latent_shape
        p = self.transformer_config["patch_size"]
        video = (frames // self.geometry.patch_size_t) * (height // p) * (width // p)
        return video + cond["encoder_hidden_states"].shape[1]

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        rotary = None
        if self.transformer_config.get("use_rotary_positional_embeddings"):
            frames, _, h, w = latents.shape
            rotary = self._rotary(frames, h, w)
        if "image_latents" in cond:  # the image's latents on the first frame, zeros after it, as extra channels
            image = cond["image_latents"][0].to(latents.dtype)
            padded = torch.cat([image, image.new_zeros(latents.shape[0] - 1, *image.shape[1:])])
            latents = torch.cat([latents, padded], dim=1)
        return PackedRequest(latents, timestep, cond["encoder_hidden_states"][0], rotary)

    @lru_cache(maxsize=64)
    def _rotary(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CogVideoX 5b-style 3D RoPE of one latent shape (the same for every request of that shape)."""
        self.pipeline.vae_scale_factor_spatial = self.geometry.spatial_factor
        f = self.geometry.spatial_factor
        return self.pipeline._prepare_rotary_positional_embeddings(height * f, width * f, frames, self.device)

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.geometry.patch_size_t == 2:  # frame counts are 1 + 8k: the odd latent count was padded by one
            latents = latents[:, 1:]
        latents = latents.permute(0, 2, 1, 3, 4) / self.pipeline.vae.config.scaling_factor
        return self.pipeline.vae.decode(latents).sample
