"""HunyuanVideo 1.5 (hunyuanvideo-community/HunyuanVideo-1.5-*): text- and image-to-video through diffusers'
`HunyuanVideo15Pipeline` / `HunyuanVideo15ImageToVideoPipeline` pieces."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from PIL import Image
from transformers import (
    ByT5Tokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)

from models import hunyuanvideo15_packed
from models.base import DiffusionAdapter
from models.interface import Condition, EncodedPrompt, Geometry, Part
from models.packed import PackedRequest
from models.spec import ModelSpec
from models.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's chat layout, for the locally trained tiny tokenizer (`_get_mllm_prompt_embeds` applies a chat template)."""
BYT5_VOCAB = 384  # ByT5Tokenizer: 3 special tokens, 256 bytes, 125 extra ids
SIGLIP_TOKENS = 729
"""SigLIP's 27 x 27 patch tokens of the input image (the pipelines' `vision_num_semantic_tokens`)."""


class HunyuanVideo15Adapter(DiffusionAdapter):
    """Latents are (C, F, H, W) per request.

    Each row's transformer input is `HunyuanVideo15Pipeline`'s: the noisy latents, then the condition latents and
    a mask channel (zeros for text-to-video), on the channel axis. An image-to-video checkpoint (its transformer's
    `task_type` "i2v") runs as `HunyuanVideo15ImageToVideoPipeline`: the input image's latents (the VAE's mode) are
    the condition on the first latent frame, with mask 1 there, and its SigLIP embeddings (729 tokens; the image
    encoder is loaded with the VAE, both encode the image once) join the condition tokens.

    A prompt is two rows of tokens: its Qwen2.5-VL hidden states (the chat template's system prefix cropped, as the
    pipeline does) and the ByT5 embeddings of the text it quotes (glyphs; none when it quotes nothing). Only their
    valid tokens are kept: the transformer masks the padding out of every attention, so the packed forward never
    carries it.
    """

    family = "hunyuanvideo15"
    packed_module = hunyuanvideo15_packed
    pipeline_cls = HunyuanVideo15Pipeline
    transformer_cls = HunyuanVideo15Transformer3DModel
    vae_cls = AutoencoderKLHunyuanVideo15
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    constructor_reads_vae = True
    IMAGE_COMPONENTS = ("image_encoder", "feature_extractor")
    """The I2V checkpoint's SigLIP image encoder: it encodes the input image where the VAE does."""

    def __init__(self, spec: ModelSpec, parts=("text", "transformer", "vae")) -> None:
        self.image_conditioned = _image_conditioned(spec)
        self.pipeline_cls = HunyuanVideo15ImageToVideoPipeline if self.image_conditioned else HunyuanVideo15Pipeline
        super().__init__(spec, parts)

    def optional_component_names(self) -> set[str]:
        return super().optional_component_names() | (set(self.IMAGE_COMPONENTS) if self.image_conditioned else set())

    def _skipped_when_loading(self, wanted: set[str]) -> set[str]:
        """The SigLIP image encoder travels with the VAE."""
        return super()._skipped_when_loading(wanted) - (set(self.IMAGE_COMPONENTS) if "vae" in wanted else set())

    tiny_variants = ("default", "i2v")

    @classmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        latent_channels = 4
        return {
            "transformer": dict(
                in_channels=2 * latent_channels + 1, out_channels=latent_channels, num_attention_heads=2,
                attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(4, 6, 6),
                # I2V sizes a request from its image's aspect in buckets around target_size: 40 makes 32 x 48 one.
                target_size=40, task_type="i2v" if spec.tiny_variant == "i2v" else "t2v",
            ),
            "vae": dict(
                latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                spatial_compression_ratio=16, temporal_compression_ratio=4,
            ),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
            "pipeline": {"guider": ClassifierFreeGuidance(guidance_scale=6.0)},
        }

    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        if part == "text":
            tokenizer = build_tiny_tokenizer()
            tokenizer.chat_template = TINY_CHAT_TEMPLATE
            text_config = Qwen2_5_VLTextConfig(
                vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=None, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            )
            glyph_config = T5Config(vocab_size=BYT5_VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0)
            return {"tokenizer": tokenizer, "text_encoder": Qwen2_5_VLTextModel(text_config).eval(),
                    "tokenizer_2": ByT5Tokenizer(), "text_encoder_2": T5EncoderModel(glyph_config).eval()}
        if part == "transformer":
            return {"transformer": HunyuanVideo15Transformer3DModel(**configs["transformer"]).eval()}
        vae = {"vae": AutoencoderKLHunyuanVideo15(**configs["vae"]).eval()}
        if configs["transformer"]["task_type"] != "i2v":
            return vae
        # SigLIP as wide as the transformer's image_embed_dim, 27 x 27 = 729 patch tokens as the real one gives.
        siglip = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=54, patch_size=2)
        return {**vae, "image_encoder": SiglipVisionModel(siglip).eval(),
                "feature_extractor": SiglipImageProcessor(size={"height": 54, "width": 54})}

    def _build_tiny(self, spec: ModelSpec, configs: dict[str, Any]):
        pipeline = super()._build_tiny(spec, configs)
        if pipeline.tokenizer is not None:
            configure_tiny_text(pipeline, spec.max_sequence_length)
        return pipeline

    def make_geometry(self) -> Geometry:
        t, v = self.transformer_config, self.vae_config
        if t.get("use_meanflow"):
            raise ValueError(f"{self.spec.source}: the MeanFlow super-resolution transformer (timestep_r) is not served")
        if t["in_channels"] != 2 * v["latent_channels"] + 1:
            raise ValueError(f"{self.spec.source}: in_channels {t['in_channels']}; HunyuanVideo 1.5 takes the latents, "
                             "their condition and a mask channel (2 x latent channels + 1)")
        return Geometry(spatial_factor=v["spatial_compression_ratio"], temporal_factor=v["temporal_compression_ratio"],
                        patch_size=t["patch_size"], patch_size_t=t["patch_size_t"],
                        text_tokens=self.spec.max_sequence_length, is_video=True)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        cond = self._encode_rows(prompts)
        uncond = self._encode_rows([n or "" for n in negative_prompts])
        return [EncodedPrompt(c, None if negative is None else u)
                for c, u, negative in zip(cond, uncond, negative_prompts)]

    def _encode_rows(self, prompts: list[str]) -> list[Condition]:
        """Each prompt's valid text and glyph tokens (`encode_prompt` pads both to fixed lengths)."""
        text, text_mask, glyph, glyph_mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, dtype=self.dtype, batch_size=len(prompts))
        return [{"encoder_hidden_states": text[i][text_mask[i].bool()].unsqueeze(0).cpu(),
                 "glyph_hidden_states": glyph[i][glyph_mask[i].bool()].unsqueeze(0).to(self.dtype).cpu()}
                for i in range(len(prompts))]

    @property
    def image_to_video(self) -> bool:
        return self.image_conditioned

    @torch.no_grad()
    def image_latents(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """As `HunyuanVideo15ImageToVideoPipeline`: the image resized and centre-cropped to the request's size, its
        latents (the VAE's mode, scaled: deterministic, so `seed` is unused) and its SigLIP tokens."""
        pipeline = self.pipeline
        image = pipeline.video_processor.resize(image.convert("RGB"), height=height, width=width, resize_mode="crop")
        latents = pipeline._get_image_latents(pipeline.vae, pipeline.video_processor, image, height, width,
                                              self.device)
        tokens = pipeline._get_image_embeds(pipeline.image_encoder, pipeline.feature_extractor, image, self.device)
        return {"image_latents": latents.to(self.dtype).cpu(), "image_embeds": tokens.to(self.dtype).cpu()}

    def image_placeholder(self, latent_shape: tuple[int, ...]) -> Condition:
        if not self.image_conditioned:
            return {}
        channels, _, height, width = latent_shape
        return {"image_latents": torch.zeros(1, channels, 1, height, width, dtype=self.dtype),
                "image_embeds": torch.zeros(1, SIGLIP_TOKENS, self.transformer_config["image_embed_dim"],
                                            dtype=self.dtype)}

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        g = self.geometry
        return (self.transformer_config["out_channels"], g.latent_frames(num_frames), height // g.spatial_factor,
                width // g.spatial_factor)

    def set_timesteps(self, sampler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        sampler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device="cpu")

    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        _, frames, height, width = latent_shape
        p, p_t = self.transformer_config["patch_size"], self.transformer_config["patch_size_t"]
        video = (frames // p_t) * (height // p) * (width // p)
        image = cond["image_embeds"].shape[1] if "image_embeds" in cond else 0
        return video + image + cond["encoder_hidden_states"].shape[1] + cond["glyph_hidden_states"].shape[1]

    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        """The latents, the condition latents (the image's on the first frame, zeros after it; all zeros for
        text-to-video) and the mask channel (1 on the image's frame)."""
        channels, frames, height, width = latents.shape
        condition = latents.new_zeros(channels + 1, frames, height, width)
        if "image_latents" in cond:
            condition[:channels, 0] = cond["image_latents"][0, :, 0].to(latents.dtype)
            condition[channels, 0] = 1.0
        image = cond["image_embeds"][0] if "image_embeds" in cond else None
        return PackedRequest(torch.cat([latents, condition]), timestep.to(latents.dtype),
                             cond["encoder_hidden_states"][0], image=image, glyph=cond["glyph_hidden_states"][0])

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def _image_conditioned(spec: ModelSpec) -> bool:
    if spec.source == "tiny":
        return spec.tiny_variant == "i2v"
    return HunyuanVideo15Transformer3DModel.load_config(spec.source, subfolder="transformer").get("task_type") == "i2v"


def configure_tiny_text(pipeline: HunyuanVideo15Pipeline, max_sequence_length: int) -> None:
    """Fit the pipeline's prompt layout to the tiny tokenizer: crop exactly the chat template's system prefix (the
    checkpoint's 108 tokens are Qwen's count) and pad to `max_sequence_length` prompt tokens (not 1000)."""
    messages = [{"role": "system", "content": pipeline.system_message}, {"role": "user", "content": ""}]
    prefix = pipeline.tokenizer.apply_chat_template(messages, tokenize=False).split("<|im_start|>user")[0]
    pipeline.prompt_template_encode_start_idx = len(pipeline.tokenizer(prefix, add_special_tokens=False).input_ids)
    pipeline.tokenizer_max_length = max_sequence_length
