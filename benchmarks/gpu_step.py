"""One packed denoising step at the real model sizes on one GPU, against the H100 cost profile of the simulator.

The simulator's 8 x H100 figures (`benchmarks/paper_eval.py`) rest on `H100Profile`, a cost model with stated
MFUs. This script checks it where it can be checked without 8 GPUs: it builds each transformer at its published
size (CogVideoX-5B, Mochi 1, Wan2.1-T2V-14B; random bf16 weights, nothing downloaded), runs the project's packed
forward (`models/<family>_packed.py`, varlen attention on the GPU) on one device, and prints for each batch the
measured step time, the profile's prediction for one rank (ring of 1), their ratio and the achieved TFLOP/s.

Batches, each with classifier-free guidance (two rows per request), at the trace's frames per model:
- one request alone at each resolution (240p .. 720p);
- `mixed`: the four resolutions packed in one pass, against the sum of the four alone (what packing different
  resolutions into one step gains or costs on a GPU).
A packed row must equal the same row run alone (bf16 tolerance): the max relative difference is printed.

`--vae` times each family's VAE decode at its released config (random bf16 weights) for one request of the
trace's frames at each resolution, against the profile's decode price (`VAE_DECODE_FLOPS_PER_VOXEL` at `VAE_MFU`):
the measured fraction of the bf16 peak is `cost_profiles.VAE_MFU`. 720p is also decoded tiled
(diffusers' `enable_tiling`, what a deployment turns on to bound the decode's memory).

`--i2v` builds the image-to-video layouts instead (CogVideoX-5b-I2V's 32 input channels, without its learned
positional embedding so that every resolution runs; Wan2.1-I2V-14B's 36 input channels and the 257 CLIP tokens each
block attends to through its added K/V): the rows carry their image condition as the adapters pack it.

`--dllm` also times one denoising step of the diffusion coder LM at Dream-7B's size (`models/dllm`, bf16) for
1 to 64 packed sequences (256 prompt + 256 response tokens, logits at the 128 still-masked positions, sampling at
DiffuCoder's temperature 0.4 / top-p 0.95): the step-batching gain on a GPU, which one CPU thread cannot show.

    python -m benchmarks.gpu_step [--models cogvideox mochi wan] [--i2v] [--vae cogvideox mochi wan] [--dllm]
                                  [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from types import ModuleType

import torch

from benchmarks.cost_profiles import (
    FORWARD_OVERHEAD_S,
    H100_MODELS,
    PEAK_BF16_FLOPS,
    PIXELS,
    VAE_DECODE_FLOPS_PER_VOXEL,
    H100Profile,
)
from benchmarks.workloads import FRAMES, TraceRequest
from models import cogvideox_packed, mochi_packed, wan_packed
from models.packed import PackedRequest, forward_packed
from models.wan import WanAdapter

RESOLUTIONS = ("240p", "360p", "480p", "720p")
DEVICE = "cuda"


def cogvideox_5b(i2v: bool = False) -> tuple[torch.nn.Module, ModuleType]:
    from diffusers import CogVideoXTransformer3DModel
    return CogVideoXTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=IN_CHANNELS["cogvideox"][i2v], out_channels=16,
        time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
        norm_elementwise_affine=True, norm_eps=1e-5, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False), cogvideox_packed


def mochi_1(i2v: bool = False) -> tuple[torch.nn.Module, ModuleType]:
    if i2v:
        raise SystemExit("Mochi has no image-to-video layout")
    from diffusers import MochiTransformer3DModel
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48, pooled_projection_dim=1536,
        in_channels=12, text_embed_dim=4096, time_embed_dim=256, max_sequence_length=256), mochi_packed


def wan_14b(i2v: bool = False) -> tuple[torch.nn.Module, ModuleType]:
    from diffusers import WanTransformer3DModel
    image = dict(image_dim=CLIP_WIDTH, added_kv_proj_dim=5120) if i2v else {}  # Wan2.1-I2V-14B
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=IN_CHANNELS["wan"][i2v],
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, **image), wan_packed


BUILDERS: dict[str, Callable[[bool], tuple[torch.nn.Module, ModuleType]]] = {
    "cogvideox": cogvideox_5b, "mochi": mochi_1, "wan": wan_14b}
IN_CHANNELS = {"cogvideox": (16, 32), "mochi": (12, 12), "wan": (16, 36)}
"""The transformer's input channels (text-to-video, image-to-video): noise, then the image condition."""
CLIP_WIDTH = 1280  # Wan 2.1 I2V's CLIP ViT-H/14 (WanAdapter.CLIP_TOKENS tokens)


def trace_request(model: str, resolution: str) -> TraceRequest:
    return TraceRequest(id=f"{model}-{resolution}", arrival_s=0.0, model=model, resolution=resolution,
                        num_frames=FRAMES[model], steps=50, prompt="", seed=0)


def rows(model: str, resolution: str, generator: torch.Generator, i2v: bool = False) -> list[PackedRequest]:
    """The two CFG rows of one request at the trace's frames, in the family's latent layout (with the image
    condition's channels and, for Wan, its CLIP tokens when `i2v`)."""
    dims = H100_MODELS[model]
    height, width = PIXELS[resolution]
    frames = (FRAMES[model] - 1) // dims.vae_temporal + 1
    h, w = height // dims.vae_spatial, width // dims.vae_spatial
    channels = IN_CHANNELS[model][i2v]
    shape = (frames, channels, h, w) if model == "cogvideox" else (channels, frames, h, w)
    latents = torch.randn(shape, generator=generator).to(DEVICE, torch.bfloat16)
    timestep = torch.tensor(500.0, device=DEVICE, dtype=torch.bfloat16)
    rotary = None
    if model == "cogvideox":  # 5b-style RoPE over the video tokens: (tokens, head_dim) cos and sin
        video = frames * (h // dims.patch) * (w // dims.patch)
        angle = torch.rand(video, 64, generator=generator).to(DEVICE) * 6.28
        rotary = (angle.cos(), angle.sin())
    image = (torch.randn(WanAdapter.CLIP_TOKENS, CLIP_WIDTH, generator=generator).to(DEVICE, torch.bfloat16)
             if i2v and model == "wan" else None)
    return [PackedRequest(latents, timestep, torch.randn(dims.text_tokens, 4096, generator=generator).to(
        DEVICE, torch.bfloat16), rotary, image=image) for _ in range(2)]


def predicted_seconds(profile: H100Profile, model: str, row_tokens: list[int]) -> tuple[float, float]:
    """The profile's step on one rank: (seconds, FLOPs it prices)."""
    dims = H100_MODELS[model]
    seconds = (profile.linear_seconds(model, sum(row_tokens))
               + sum(profile.attention_seconds(model, n, 1) for n in row_tokens) + FORWARD_OVERHEAD_S)
    text = 0 if dims.joint_text else dims.text_tokens
    flops = sum(2 * dims.params * n + dims.layers * 4 * n * (n + text) * dims.hidden for n in row_tokens)
    return seconds, flops


def timed(fn: Callable[[], list[torch.Tensor]], repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of `fn` over `repeats` after one warm-up, synchronising the device; and its last output."""
    out = fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2], out


def bench_model(name: str, repeats: int, i2v: bool = False) -> list[dict]:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model, family = BUILDERS[name](i2v)
    torch.set_default_dtype(torch.float32)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}{' image-to-video' if i2v else ''}: {params / 1e9:.2f} B parameters (profile: "
          f"{H100_MODELS[name].params / 1e9:.1f} B)", flush=True)
    profile, generator, results = H100Profile(world_size=1), torch.Generator().manual_seed(0), []
    alone: dict[str, tuple[float, list[torch.Tensor]]] = {}
    batches = {r: rows(name, r, generator, i2v) for r in RESOLUTIONS}
    with torch.inference_mode():
        for resolution, requests in [*batches.items(), ("mixed", [r for rs in batches.values() for r in rs])]:
            tokens = family.token_counts(model, requests)
            expected = [n for r in (RESOLUTIONS if resolution == "mixed" else (resolution,))
                        for n in profile.row_tokens(trace_request(name, r))]
            assert tokens == expected, (tokens, expected)
            seconds, out = timed(lambda batch=requests: forward_packed(family, model, batch), repeats)
            predicted, flops = predicted_seconds(profile, name, tokens)
            row = dict(model=name, i2v=i2v, batch=resolution, rows=len(tokens), tokens=sum(tokens),
                       measured_s=seconds, predicted_s=predicted, measured_over_predicted=seconds / predicted,
                       achieved_tflops=flops / seconds / 1e12, mfu=flops / seconds / PEAK_BF16_FLOPS)
            if resolution == "mixed":
                serial = sum(s for s, _ in alone.values())
                solo = [o for r in RESOLUTIONS for o in alone[r][1]]
                row["alone_sum_s"], row["packed_speedup"] = serial, serial / seconds
                row["max_rel_diff_vs_alone"] = max(
                    float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(out, solo))
            else:
                alone[resolution] = (seconds, out)
            results.append(row)
            extra = (f"  packed {row['packed_speedup']:.2f}x the four alone ({row['alone_sum_s']:.3f} s), "
                     f"max rel diff {row['max_rel_diff_vs_alone']:.1e}" if resolution == "mixed" else "")
            print(f"  {resolution:>5} {row['rows']} rows {row['tokens']:>6} tokens: {seconds:.3f} s measured, "
                  f"{predicted:.3f} s predicted ({row['measured_over_predicted']:.2f}x), "
                  f"{row['achieved_tflops']:.0f} TFLOP/s ({100 * row['mfu']:.0f}% of peak){extra}", flush=True)
    return results


def bench_vae(name: str, repeats: int) -> list[dict]:
    """The decode of one request's latents at each resolution by the family's released VAE (bf16), untiled and tiled."""
    from benchmarks.vae_flops import LATENT_CHANNELS, VAES

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        vae = VAES[name]().eval()
    torch.set_default_dtype(torch.float32)
    dims, profile, results = H100_MODELS[name], H100Profile(world_size=1), []
    print(f"{name} VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M parameters", flush=True)
    with torch.inference_mode():
        for resolution, tiled in [*((r, False) for r in RESOLUTIONS), ("720p", True)]:
            request = trace_request(name, resolution)
            height, width = PIXELS[resolution]
            frames = (request.num_frames - 1) // dims.vae_temporal + 1
            latents = torch.randn(1, LATENT_CHANNELS[name], frames, height // dims.vae_spatial,
                                  width // dims.vae_spatial, device=DEVICE, dtype=torch.bfloat16)
            vae.enable_tiling() if tiled else vae.disable_tiling()
            torch.cuda.reset_peak_memory_stats()
            try:
                seconds, out = timed(lambda: [vae.decode(latents).sample], repeats)
            except torch.cuda.OutOfMemoryError:
                print(f"  {resolution} {'tiled' if tiled else 'untiled'}: out of memory", flush=True)
                continue
            voxels = out[0][0, 0].numel()
            flops = VAE_DECODE_FLOPS_PER_VOXEL[name] * voxels
            predicted = profile.decode_seconds(request)
            row = dict(model=name, stage="vae_decode", batch=resolution, tiled=tiled, frames=out[0].shape[2],
                       measured_s=seconds, predicted_s=predicted, measured_over_predicted=seconds / predicted,
                       mfu=flops / seconds / PEAK_BF16_FLOPS,
                       peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            results.append(row)
            print(f"  {resolution:>5} {'tiled' if tiled else 'untiled':7} {row['frames']} frames: {seconds:.3f} s "
                  f"measured, {predicted:.3f} s priced ({row['measured_over_predicted']:.2f}x), "
                  f"{100 * row['mfu']:.1f}% of the bf16 peak, {row['peak_memory_gb']:.1f} GB peak", flush=True)
            del out
    return results


DREAM_7B = dict(model_type="Dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                rope_theta=1e6, rms_norm_eps=1e-6, mask_token_id=151666, pad_token_id=151643, eos_token_id=151643,
                bos_token_id=151643, tie_word_embeddings=False)
"""Dream-v0-Instruct-7B / Dream-Coder-7B's config.json (Qwen2.5-7B's shape)."""


def bench_dllm(repeats: int, batches: tuple[int, ...] = (1, 4, 16, 64), prompt: int = 256, response: int = 256,
               masked: int = 128) -> list[dict]:
    from models.dllm.config import DllmConfig
    from models.dllm.decoding import DecodeParams, sample_tokens
    from models.dllm.model import DiffusionLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = DiffusionLM(DllmConfig(**DREAM_7B)).eval()
    torch.set_default_dtype(torch.float32)
    params = DecodeParams(max_tokens=response, steps=response, alg="entropy", temperature=0.4, top_p=0.95)
    generator = torch.Generator(DEVICE).manual_seed(0)
    print(f"dream-7b: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    results, single = [], None
    with torch.inference_mode():
        for batch in batches:
            length = prompt + response
            ids = torch.randint(0, 151000, (batch * length,), device=DEVICE)
            rows = torch.cat([torch.arange(i * length + prompt, i * length + prompt + masked, device=DEVICE)
                              for i in range(batch)])

            def step(ids=ids, lengths=[length] * batch, rows=rows) -> list[torch.Tensor]:
                logits = model.forward_packed(ids, lengths, logit_rows=rows)
                return list(sample_tokens(logits, params, generator))

            seconds, _ = timed(step, repeats)
            single = single or seconds
            row = dict(model="dream-7b", batch=batch, tokens=batch * length, measured_s=seconds,
                       request_steps_per_s=batch / seconds, speedup_vs_one_at_a_time=batch * single / seconds)
            results.append(row)
            print(f"  {batch:>3} packed x {length} tokens: {1000 * seconds:.1f} ms per step, "
                  f"{row['request_steps_per_s']:.0f} request-steps/s, {row['speedup_vs_one_at_a_time']:.2f}x one "
                  "at a time", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=sorted(BUILDERS), default=["cogvideox", "mochi", "wan"])
    parser.add_argument("--i2v", action="store_true", help="the models' image-to-video layouts")
    parser.add_argument("--vae", nargs="*", choices=sorted(BUILDERS), default=[],
                        help="also time these families' VAE decode")
    parser.add_argument("--dllm", action="store_true", help="also time the 7B diffusion coder LM's step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_step needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = []
    benches: list[Callable[[], list[dict]]] = [
        *(lambda n=n: bench_model(n, args.repeats, args.i2v) for n in args.models),
        *(lambda n=n: bench_vae(n, args.repeats) for n in args.vae),
        *([lambda: bench_dllm(args.repeats)] if args.dllm else [])]
    for bench in benches:
        results += bench()
        gc.collect()  # the model died with its function: give its memory back before the next one
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
