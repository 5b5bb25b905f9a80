"""Model adapters: the one place that knows how a diffusers family runs.

The engine never calls a diffusers pipeline's `__call__` (that loop denoises one
batch of same-shaped requests from start to end). Instead an adapter exposes the
pieces of that loop one at a time, so the step scheduler can interleave requests:

    encode()          prompt -> Condition                          (TextEncoder)
    encode_image()    image-to-video: input image -> its latents   (VaeDecoder, once per request)
    new_sampler()     a fresh diffusers scheduler per request      (ModelRunner)
    initial_latents() seeded noise, condition_latents() its image frame  (ModelRunner)
    forward_packed()  one packed transformer pass, any shapes      (ModelRunner)
    sampler_step()    x_t -> x_{t-1} for one request               (ModelRunner)
    decode()          latents -> uint8 frames                      (VaeDecoder)

Each deployment loads only the parts it needs (`parts=`), so a replica of the
text encoder never holds the transformer's weights. The tiny variant builds every
component from a small config with seeded random weights; the real one uses
`DiffusionPipeline.from_pretrained` with the unneeded components set to None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from PIL import Image

from attention.context import AttentionContext, LocalAttention
from models.block_caches import BlockCaches
from models.interface import Condition, EncodedPrompt, Geometry, Part
from models.onednn_conv import route_conv3d_to_onednn
from models.packed import PackedRequest, forward_packed
from models.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiffusionAdapter(ABC):
    """Abstract base of a model family; subclasses register in `models`."""

    family: ClassVar[str]
    pipeline_cls: ClassVar[type[DiffusionPipeline]]
    transformer_cls: ClassVar[type]
    vae_cls: ClassVar[type]
    text_components: ClassVar[tuple[str, ...]]
    """Pipeline components needed to encode prompts (text encoders and tokenizers)."""
    tiny_variants: ClassVar[tuple[str, ...]] = ("default",)
    """Layouts the tiny source can build (`ModelSpec.tiny_variant`)."""
    min_steps: ClassVar[int] = 1
    """Fewest denoising steps the family's schedule can make (the API refuses fewer with a 400)."""
    constructor_reads_vae: ClassVar[bool] = False
    """Whether the pipeline's constructor reads its VAE even where this process loads none (HunyuanVideo 1.5: the
    latent channels): such a process builds the VAE weightless, on the meta device, for the constructor only."""

    def __init__(self, spec: ModelSpec, parts: Iterable[Part] = ("text", "transformer", "vae")) -> None:
        self.spec = spec
        self.parts = frozenset(parts)
        self.dtype = _DTYPES[spec.dtype]
        self.device = torch.device("cpu")
        if spec.source == "tiny":
            if spec.tiny_variant not in self.tiny_variants:
                raise ValueError(f"{spec.name}: tiny_variant {spec.tiny_variant!r} is not a {self.family} layout; "
                                 f"allowed: {', '.join(self.tiny_variants)}")
            configs = self.tiny_configs(spec)
            self.transformer_config: dict[str, Any] = configs["transformer"]
            self.vae_config: dict[str, Any] = configs["vae"]
            self.pipeline = self._build_tiny(spec, configs)
        else:
            self.pipeline = self._load_pretrained(spec)
            self.transformer_config = dict(self.transformer_cls.load_config(spec.source, subfolder="transformer"))
            self.vae_config = dict(self.vae_cls.load_config(spec.source, subfolder="vae"))
        if getattr(self.pipeline, "vae", None) is not None:
            route_conv3d_to_onednn(self.pipeline.vae)  # the CPU decode's largest cost (models.onednn_conv)
        self.scheduler_config = self.pipeline.scheduler.config
        if spec.image_input and not self.runs_both_pipelines:
            raise ValueError(f"{spec.name}: image_input is for checkpoints that run both pipelines (LTX-Video, "
                             f"Wan2.2-TI2V-5B); this {self.family} checkpoint's image-to-video is a checkpoint of "
                             "its own, read from its config")
        self.geometry = self.make_geometry()

    # ---- construction -------------------------------------------------
    @classmethod
    @abstractmethod
    def tiny_configs(cls, spec: ModelSpec) -> dict[str, Any]:
        """Configs of the tiny variant: 'transformer', 'vae' dicts and anything else the builder needs."""

    @abstractmethod
    def build_tiny_components(self, configs: dict[str, Any], part: Part) -> dict[str, Any]:
        """Instantiate the tiny pipeline components of one part; weights come from the global seed."""

    @abstractmethod
    def make_geometry(self) -> Geometry: ...

    def _build_tiny(self, spec: ModelSpec, configs: dict[str, Any]) -> DiffusionPipeline:
        # One seed per component, so a process that builds only the transformer gets the
        # same transformer weights as one that builds everything.
        components: dict[str, Any] = {name: None for name in self.optional_component_names()}
        components["scheduler"] = configs["scheduler"]
        components.update(configs.get("pipeline", {}))  # pipeline config entries (e.g. Wan 2.2's boundary_ratio)
        with torch.random.fork_rng():  # leave the caller's global RNG as it was
            for offset, part in enumerate(("text", "transformer", "vae")):
                if part in self.parts:
                    torch.manual_seed(spec.weights_seed * 1000 + offset)
                    components.update(self.build_tiny_components(configs, part))
        stand_in = self._vae_stand_in(lambda: configs["vae"])
        pipeline = self._without_stand_in(self.pipeline_cls(**{**components, **stand_in}), stand_in)
        return pipeline.to(dtype=self.dtype) if self.dtype != torch.float32 else pipeline

    def _load_pretrained(self, spec: ModelSpec) -> DiffusionPipeline:
        wanted: set[str] = set(self.parts & {"transformer", "vae"})
        if "text" in self.parts:
            wanted |= set(self.text_components)
        skipped = {name: None for name in self._skipped_when_loading(wanted)}
        stand_in = self._vae_stand_in(lambda: self.vae_cls.load_config(spec.source, subfolder="vae"))
        pipeline = self.pipeline_cls.from_pretrained(spec.source, dtype=self.dtype, **{**skipped, **stand_in})
        return self._without_stand_in(pipeline, stand_in)

    def _vae_stand_in(self, vae_config: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A weightless VAE for a constructor that reads it (`constructor_reads_vae`) where no VAE is loaded."""
        if not self.constructor_reads_vae or "vae" in self.parts:
            return {}
        with torch.device("meta"):
            return {"vae": self.vae_cls.from_config(vae_config())}

    @staticmethod
    def _without_stand_in(pipeline: DiffusionPipeline, stand_in: dict[str, Any]) -> DiffusionPipeline:
        if stand_in:
            pipeline.register_modules(**dict.fromkeys(stand_in))
        return pipeline

    def _skipped_when_loading(self, wanted: set[str]) -> set[str]:
        """Components `from_pretrained` is told not to load (passed as None)."""
        return self.optional_component_names() - wanted

    def optional_component_names(self) -> set[str]:
        return {"transformer", "vae", *self.text_components}

    def to(self, device: str) -> "DiffusionAdapter":
        self.device = torch.device(device)
        self.pipeline.to(self.device)
        return self

    # ---- text ---------------------------------------------------------
    @abstractmethod
    def encode(self, prompts: list[str], negative_prompts: list[str | None]) -> list[EncodedPrompt]:
        """Encode a batch of prompts; a None negative prompt means the request uses no CFG."""

    # ---- sampling -----------------------------------------------------
    def new_sampler(self, num_steps: int, latent_shape: tuple[int, ...]) -> Any:
        """A fresh diffusers scheduler with its timesteps set: each request owns one (they are stateful)."""
        sampler = type(self.pipeline.scheduler).from_config(self.scheduler_config)
        self.set_timesteps(sampler, num_steps, latent_shape)
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(0)
        return sampler

    def set_timesteps(self, sampler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        sampler.set_timesteps(num_steps, device="cpu")

    @abstractmethod
    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """Shape of one request's latents, without the batch dim, in the transformer's layout."""

    def initial_latents(self, shape: tuple[int, ...], seed: int, sampler: Any) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((1, *shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        # Flow-matching schedulers start from unit noise and define no init_noise_sigma.
        return noise * getattr(sampler, "init_noise_sigma", 1.0)

    def condition_latents(self, latents: torch.Tensor, cond: Condition) -> torch.Tensor:
        """A request's first latents given its row condition: the noise itself, or, where the image is the first latent
        frame, the noise with the image's latents as that frame, which `sampler_step` then keeps."""
        if not self.image_first_frame:
            return latents
        return torch.cat([cond["image_latents"].to(latents), latents[:, :, 1:]], dim=2)

    def sampler_step(self, sampler: Any, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                     extra: dict[str, Any]) -> torch.Tensor:
        """Advance one request by one step; `extra` is per-request sampler state the family may keep. An image
        first frame stays as it is: the samplers of those families (flow Euler, UniPC) are elementwise, so stepping
        the other frames alone, as their pipelines do, gives the same values."""
        stepped = sampler.step(noise_pred, t, latents, return_dict=False)[0]
        return torch.cat([latents[:, :, :1], stepped[:, :, 1:]], dim=2) if self.image_first_frame else stepped

    # ---- transformer ----------------------------------------------------
    packed_module: ClassVar[ModuleType]
    """The family's packed forward (`models/<family>_packed.py`)."""

    @abstractmethod
    def row_tokens(self, latent_shape: tuple[int, ...], cond: Condition) -> int:
        """Tokens of one forward row in the transformer's self-attention: what the Brick planner shards."""

    @abstractmethod
    def packed_request(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition) -> PackedRequest:
        """One forward row's input in the packed forward's per-sample layout (no batch dim)."""

    @property
    def shardable(self) -> bool:
        """Whether the packed forward runs sharded over a Brick ring (the planner keeps other models on 1 rank)."""
        return True

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def expert_count(self) -> int:
        """Transformers that share the denoising (Wan 2.2 A14B: 2, split by timestep); known without weights."""
        return 1

    def expert_index(self, timestep: torch.Tensor | float) -> int:
        """Which expert denoises a row at this timestep (0-based; index 1 is `transformer_2`)."""
        return 0

    def expert(self, index: int) -> torch.nn.Module:
        return self.transformer

    def expert_switch_step(self, num_steps: int, latent_shape: tuple[int, ...]) -> int | None:
        """The first step of a request that the second expert runs (None with one expert): what the scheduler
        needs to price each step's forwards, from the same timesteps the runner's sampler makes."""
        if self.expert_count == 1:
            return None
        timesteps = self.new_sampler(num_steps, latent_shape).timesteps
        return next((i for i, t in enumerate(timesteps) if self.expert_index(t) == 1), len(timesteps))

    def forward_packed(self, latents: list[torch.Tensor], timesteps: list[torch.Tensor], conds: list[Condition],
                       ctx: AttentionContext | None = None, caches: BlockCaches | None = None) -> list[torch.Tensor]:
        """Predictions of many rows of any shapes, text lengths and timesteps in one pass per expert.

        latents[i] has this family's per-request layout without the batch dim; the result
        is one prediction per row shaped like it, in the transformer's dtype. With a
        `ShardedAttention` context this rank computes its shards (Brick Attention) and the
        group all-gathers the outputs, so every rank returns every row whole. A two-expert
        model runs the rows of each expert in that expert's forward (at most one per expert,
        in expert order, so every rank of a group enters the same collectives). `caches` (the block-level
        step caches of some rows, one-transformer models only: `cache_modes`) is filled with whole tensors.
        """
        ctx = ctx or LocalAttention()
        rows = [self.packed_request(x.to(self.device), t.to(self.device), c)
                for x, t, c in zip(latents, timesteps, conds)]
        by_expert: dict[int, list[int]] = {}
        for i, t in enumerate(timesteps):
            by_expert.setdefault(self.expert_index(t), []).append(i)
        if len(by_expert) == 1:
            (index,) = by_expert
            return forward_packed(self.packed_module, self.expert(index), rows, ctx, caches)
        if caches is not None:
            raise ValueError("block-level step caches run on one-transformer models only")
        out: list[torch.Tensor | None] = [None] * len(rows)
        for index in sorted(by_expert):
            members = by_expert[index]
            predictions = forward_packed(self.packed_module, self.expert(index), [rows[i] for i in members],
                                         ctx.subset(members))
            for i, prediction in zip(members, predictions):
                out[i] = prediction
        return out  # type: ignore[return-value]

    @property
    def cache_modes(self) -> tuple[str, ...]:
        """Step-cache modes this model runs: none and taylorseer everywhere; magcache, first_block and teacache
        where the family's packed forward runs block-level caches (`skipped_blocks_prediction`,
        `timestep_modulation`, `output_rows` filling `BlockCaches`) and one transformer denoises."""
        block_cache = hasattr(self.packed_module, "skipped_blocks_prediction") and self.expert_count == 1
        if not block_cache:
            return ("none", "taylorseer")
        return ("none", "taylorseer", "magcache", "first_block", "teacache")

    def timestep_modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        """What TeaCache decides a step from: the timestep's modulation of the blocks (one-transformer models)."""
        return self.packed_module.timestep_modulation(self.transformer, timestep.to(self.device))

    def skipped_blocks_prediction(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition,
                                  residual: torch.Tensor) -> torch.Tensor:
        """One row's prediction on a step MagCache skips: embeddings and head only, the blocks' output being their
        input plus `residual`. Local to the process (every rank of a group holds the row and its residual)."""
        row = self.packed_request(latents.to(self.device), timestep.to(self.device), cond)
        return self.packed_module.skipped_blocks_prediction(self.transformer, row, residual)

    def request_condition(self, fps: int | None) -> Condition:
        """Conditioning of a request beyond its text, added to each of its rows at admission (LTX: the frame rate
        its RoPE is scaled by); None fps means the model's default."""
        return {}

    # ---- image-to-video ---------------------------------------------------
    @property
    def image_to_video(self) -> bool:
        """Whether every request is conditioned on an input image (its latents enter the request's rows as
        `image_latents`, encoded once by `encode_image`); known from the configs, without weights."""
        return self.image_first_frame

    def encode_image(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """The input image resized to the request's size as the family's image-to-video pipeline does, through the
        VAE encoder (a posterior sample from the request's seed, or its mode, as that pipeline draws it): the
        `image_latents` row condition (and `image_embeds` where the transformer attends to image tokens)."""
        if not self.image_to_video:
            raise ValueError(f"{self.spec.name} is not an image-to-video model")
        return self.image_latents(image, height, width, num_frames, seed)

    @property
    def runs_both_pipelines(self) -> bool:
        """Whether one checkpoint runs both the text- and the image-to-video pipeline, so that `ModelSpec.image_input`
        chooses (LTX-Video, Wan2.2-TI2V-5B)."""
        return False

    @property
    def image_first_frame(self) -> bool:
        """Whether the input image's latents are the request's first latent frame, kept by every step and modulated at
        timestep 0 (an `image_input` entry; latents laid out (1, C, F, H, W)), not extra channels beside every frame."""
        return self.spec.image_input

    def image_latents(self, image: Image.Image, height: int, width: int, num_frames: int, seed: int) -> Condition:
        """`encode_image` of a family that has image-to-video checkpoints."""
        raise NotImplementedError(f"{self.family} has no image-to-video layout")

    def image_placeholder(self, latent_shape: tuple[int, ...]) -> Condition:
        """Zero image latents of a request's shape (what the step-cost probe runs an image-to-video model with)."""
        return {}

    def check_condition(self, cond: Condition, latent_shape: tuple[int, ...]) -> None:
        """Refuse embeddings the transformer cannot take (before any rank enters a collective with them)."""
        config = self.transformer_config
        text_width = (config.get("text_embed_dim") or config.get("text_dim") or config.get("joint_attention_dim")
                      or config.get("caption_channels"))
        widths = {"encoder_hidden_states": text_width, "pooled_projections": config.get("pooled_projection_dim"),
                  "image_embeds": config.get("image_dim")}
        for key, tensor in cond.items():
            if tensor.shape[0] != 1:
                raise ValueError(f"{key}: one row expected, got batch {tensor.shape[0]}")
            width = widths.get(key)
            if width is not None and tensor.shape[-1] != width:
                raise ValueError(f"{key}: width {tensor.shape[-1]}, the transformer takes {width}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{key}: non-finite values")
        placeholder = self.image_placeholder(latent_shape)
        for key in ("image_latents", "image_embeds"):
            if (key in placeholder) != (key in cond):
                raise ValueError(f"{key}: {'missing' if key in placeholder else 'given'}; the model "
                                 f"{'takes' if key in placeholder else 'takes no'} {key}")
        if "image_latents" in cond and cond["image_latents"].shape != placeholder["image_latents"].shape:
            raise ValueError(f"image_latents: {tuple(cond['image_latents'].shape)}, the model takes "
                             f"{tuple(placeholder['image_latents'].shape)}")

    # ---- vae ------------------------------------------------------------
    @abstractmethod
    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of a batch: video (B, C, F, H, W) or image (B, C, H, W) in [-1, 1]."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (B, ...) -> uint8 frames (B, F, H, W, 3); images have F == 1."""
        pixels = self.decode_to_pixels(latents.to(self.device, self.dtype)).float().cpu()
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        frames = VideoProcessor().postprocess_video(pixels, output_type="np")
        return (np.asarray(frames) * 255).round().astype(np.uint8)
