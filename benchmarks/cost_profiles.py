"""Cost of one engine step, for the simulator: what a `StepPlan` costs on a given machine.

`H100Profile` (8 x H100 SXM, NVLink) prices the real model sizes from first principles:

- token-wise layers: 2 x transformer parameters FLOPs per token (QKV/out projections,
  FFN, modulation), at `LINEAR_MFU` of the bf16 dense peak (989 TFLOP/s) for large
  GEMMs, scaled by M / (M + `GEMM_HALF_TOKENS`) for a rank's M tokens of one model in
  one step: the packed forward runs all its rows through the same GEMMs, so a rank
  holding many small shards computes as efficiently as one holding a big one, while a
  lone short shard leaves the GPU partly idle;
- self-attention: 4 x S² x hidden FLOPs per layer (QKᵀ and AV), at `ATTENTION_MFU`;
  Wan's cross-attention to its 512 text tokens, 4 x S x 512 x hidden per layer;
- a row sharded over a ring of r ranks: every rank does 1/r of the token-wise work and
  r ring steps per layer, each computing a (S/r)² block while the next K/V block
  (2 x S/r x hidden bf16) travels at `NVLINK_BYTES_PER_S`; transfer and compute overlap
  (the step costs the larger of the two) plus `HOP_LATENCY_S` per hop;
- attention rows on the same rank run one after the other; a step lasts as long as its busiest
  rank plus `FORWARD_OVERHEAD_S` per model forward (kernel launches, sampler, the
  all-gather of predictions).

MFU choice: 0.40 for GEMMs (large bf16 GEMMs reach 60-70% of peak on H100, a whole
DiT block with its norms and elementwise work ~40%), half of that at 256 tokens (a
256-row GEMM fills about half of the 132 SMs' 128-row tiles at hidden size 3072-5120),
and 0.35 for attention (FlashAttention-2 forward reaches ~350 TFLOP/s on H100 at head
dim 64-128). CFG doubles
the rows (uncond + text). The prompt encoding is priced from the text encoder's FLOPs at `LINEAR_MFU`; the VAE
decode from each family's decoder FLOPs per output pixel-frame (`benchmarks.vae_flops`) at the fraction of peak
measured on one H200 (`VAE_MFU`), on one VAE replica that decodes one request at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from attention.plan import BrickPlan
from benchmarks.workloads import TraceRequest
from engine.config import PlannerConfig
from engine.messages import StepPlan

PEAK_BF16_FLOPS = 989e12
LINEAR_MFU = 0.40
ATTENTION_MFU = 0.35
NVLINK_BYTES_PER_S = 450e9  # per direction, H100 SXM NVLink 4
HOP_LATENCY_S = 10e-6
FORWARD_OVERHEAD_S = 0.004
GEMM_HALF_TOKENS = 256
VAE_MFU = {"cogvideox": 0.15, "mochi": 0.31, "wan": 0.15}
"""Fraction of the bf16 peak each family's VAE decode reaches, measured untiled on one H200 at 240p-720p
(`python -m benchmarks.gpu_step --models --vae wan cogvideox mochi`, benchmarks/results/gpu_vae_h200.json):
CogVideoX 14-15%, Mochi 30-34%, Wan 14-16%. The H200 has the H100's compute peak and 1.4x its memory bandwidth,
so an H100 may fall somewhat short of these; tiled decoding (to bound memory) cost 1.4-2.3x more at 720p."""
VAE_DECODE_FLOPS_PER_VOXEL = {"cogvideox": 18.89e6, "mochi": 21.88e6, "wan": 8.70e6}
"""FLOPs of the VAE decoder per output pixel-frame (printed by `python -m benchmarks.vae_flops`)."""


class CostProfile(ABC):
    """A machine and its models: tokens per request, seconds per step, ranks, the planner's thresholds."""

    world_size: int
    planner: PlannerConfig

    @abstractmethod
    def row_tokens(self, request: TraceRequest) -> tuple[int, ...]:
        """Self-attention tokens of each forward row of the request (two rows with CFG)."""

    @abstractmethod
    def step_seconds(self, plan: StepPlan) -> float:
        """Wall time of one step of the worker group."""

    decode_servers: int | None = None
    """Requests decoded at once after their last step (a VAE replica decodes one at a time); None: no queue."""

    decode_displaces_ranks: int = 0
    """Ranks each running decode takes from the step planner (the app's `decode_displaces_ranks`)."""

    shared_cores: int | None = None
    """Cores the ranks and the decode servers share (this CPU machine); None: each has its own device."""

    per_job_threads: float = 0.0
    """Busy threads that each job in the system adds where cores are shared (the app's per-job work outside the
    step: progress messages, status polls), as a fraction of a thread."""

    def encode_seconds(self, request: TraceRequest) -> float:
        """Prompt encoding, before the request joins the pool."""
        return 0.0

    def decode_seconds(self, request: TraceRequest) -> float:
        """VAE decode and media encoding, after its last step."""
        return 0.0


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    params: float  # transformer parameters
    text_tokens: int  # tokens of the prompt
    text_params: float  # the text encoder's parameters (T5-XXL / umT5-XXL encoder)
    joint_text: bool  # text tokens join the self-attention sequence (CogVideoX, Mochi); else cross-attention (Wan)
    vae_temporal: int
    vae_spatial: int = 8
    patch: int = 2


H100_MODELS = {
    "cogvideox": ModelDims(hidden=3072, layers=42, params=5.0e9, text_tokens=226, text_params=4.76e9,
                           joint_text=True, vae_temporal=4),
    "mochi": ModelDims(hidden=3072, layers=48, params=10.0e9, text_tokens=256, text_params=4.76e9, joint_text=True,
                       vae_temporal=6),
    "wan": ModelDims(hidden=5120, layers=40, params=14.0e9, text_tokens=512, text_params=5.68e9, joint_text=False,
                     vae_temporal=4),
}
"""CogVideoX-5B, Mochi 1 (10B; its text stream is narrower, counted at the visual width), Wan2.1-T2V-14B."""

PIXELS = {"240p": (240, 432), "360p": (352, 640), "480p": (480, 848), "720p": (720, 1280)}
"""(height, width) of 16:9 at each resolution, rounded to the models' 16-pixel multiple as the app does."""


class H100Profile(CostProfile):
    decode_servers = 1  # one VAE replica, decoding one request at a time (configs/gpu.yaml)

    def __init__(self, world_size: int = 8) -> None:
        self.world_size = world_size
        self.planner = PlannerConfig(min_shard_tokens=1024, ring_sizes=(1, 2, 4, 8))

    def encode_seconds(self, request: TraceRequest) -> float:
        dims = H100_MODELS[request.model]
        return 2 * dims.text_params * dims.text_tokens / (PEAK_BF16_FLOPS * LINEAR_MFU)

    def decode_seconds(self, request: TraceRequest) -> float:
        height, width = PIXELS[request.resolution]
        voxels = request.num_frames * height * width
        return VAE_DECODE_FLOPS_PER_VOXEL[request.model] * voxels / (PEAK_BF16_FLOPS * VAE_MFU[request.model])

    def row_tokens(self, request: TraceRequest) -> tuple[int, ...]:
        dims = H100_MODELS[request.model]
        height, width = PIXELS[request.resolution]
        frames = (request.num_frames - 1) // dims.vae_temporal + 1
        side = dims.vae_spatial * dims.patch
        tokens = frames * (height // side) * (width // side) + (dims.text_tokens if dims.joint_text else 0)
        return (tokens, tokens)  # CFG: uncond and text rows

    def linear_seconds(self, model: str, tokens: int) -> float:
        """One rank's token-wise layers over `tokens` packed tokens of `model`."""
        dims = H100_MODELS[model]
        efficiency = LINEAR_MFU * tokens / (tokens + GEMM_HALF_TOKENS)
        return 2 * dims.params * tokens / (PEAK_BF16_FLOPS * efficiency)

    def attention_seconds(self, model: str, tokens: int, ring: int) -> float:
        """One rank's attention for its shard of one row sharded over `ring` ranks (ring steps overlap transfers)."""
        dims = H100_MODELS[model]
        shard = tokens / ring
        block = 4 * shard**2 * dims.hidden / (PEAK_BF16_FLOPS * ATTENTION_MFU)
        transfer = 2 * shard * dims.hidden * 2 / NVLINK_BYTES_PER_S + HOP_LATENCY_S
        cross = 0.0 if dims.joint_text else 4 * shard * dims.text_tokens * dims.hidden / (PEAK_BF16_FLOPS * ATTENTION_MFU)
        return dims.layers * (block + (ring - 1) * max(block, transfer) + cross)

    def step_seconds(self, plan: StepPlan) -> float:
        return busiest_rank_seconds(plan.rings, self.world_size, self) + FORWARD_OVERHEAD_S * len(plan.rings)


def busiest_rank_seconds(rings: dict[str, BrickPlan], world_size: int, profile) -> float:
    """Per rank and model, one packed pass of the token-wise layers over the rank's tokens plus each row's attention;
    the group waits for its busiest rank."""
    loads = [0.0] * world_size
    for model, brick in rings.items():
        tokens = [0] * world_size
        for assignment in brick.assignments:
            seconds = profile.attention_seconds(model, assignment.tokens, assignment.size)
            for position, rank in enumerate(assignment.ranks):
                loads[rank] += seconds
                tokens[rank] += assignment.shard_len(position)
        for rank, n in enumerate(tokens):
            if n:
                loads[rank] += profile.linear_seconds(model, n)
    return max(loads)
