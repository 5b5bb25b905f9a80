"""Packed vs padded batching of one mixed-resolution step on the tiny CogVideoX and Wan models.

The batch: one request per resolution name at the tests' scaled-down heights (32..96
pixels for 240p..720p, 16:9, with different frame counts, timesteps and text lengths). Three ways to run one step:
- packed: one `forward_packed` pass over all requests (varlen attention, no padding);
- padded: one batched diffusers forward with every request padded to the largest
  shape (what batching without varlen costs; masking the pads would not make it cheaper);
- per shape: one diffusers forward per distinct shape (the engine before packing).
Prints time per step (median of --repeats), and the FLOPs padding wastes, from the
models' dimensions (projections, attention, FFN per block; elementwise ops ignored).

    python -m benchmarks.packed_vs_padded [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import median_seconds
from models import load_adapter
from models.packed import PackedRequest, forward_packed
from models.spec import ModelSpec

HEIGHTS = {"240p": 32, "360p": 48, "480p": 64, "720p": 96}  # pixels, scaled down as in the tests
FRAMES = {"240p": 17, "360p": 9, "480p": 5, "720p": 1}
TEXT = {"240p": 16, "360p": 11, "480p": 16, "720p": 7}


def _spec(family: str) -> ModelSpec:
    return ModelSpec(name=f"{family}-tiny", family=family, max_sequence_length=16, max_frames=17,
                     resolution_heights=HEIGHTS)


def build_batch(family: str):
    adapter = load_adapter(_spec(family), ["transformer"])
    model, geo = adapter.pipeline.transformer, adapter.geometry
    g = torch.Generator().manual_seed(0)
    requests = []
    for i, (name, height) in enumerate(HEIGHTS.items()):
        width = (height * 16 // 9) // (geo.spatial_factor * 2) * (geo.spatial_factor * 2)
        frames = (FRAMES[name] - 1) // geo.temporal_factor + 1
        h, w = height // geo.spatial_factor, width // geo.spatial_factor
        t = torch.tensor(900.0 - 200 * i)
        if family == "wan":
            lat = torch.randn(model.config.in_channels, frames, h, w, generator=g)
            requests.append(PackedRequest(lat, t, torch.randn(TEXT[name], model.config.text_dim, generator=g)))
        else:
            adapter.pipeline.vae_scale_factor_spatial = geo.spatial_factor
            rot = adapter.pipeline._prepare_rotary_positional_embeddings(height, width, frames, "cpu")
            lat = torch.randn(frames, model.config.in_channels, h, w, generator=g)
            requests.append(PackedRequest(lat, t, torch.randn(TEXT[name], model.config.text_embed_dim, generator=g), rot))
    return adapter, model, requests


def _diffusers(family, model, latents, text, timesteps, rotary):
    if family == "wan":
        return model(latents, timesteps, text, return_dict=False)[0]
    return model(latents, text, timesteps, image_rotary_emb=rotary, return_dict=False)[0]


def padded_inputs(family, adapter, requests):
    """Every request padded (zeros) to the largest size of each latent dim and text length: one dense batch."""
    shape = [max(r.latents.shape[d] for r in requests) for d in range(requests[0].latents.ndim)]
    text_len = max(len(r.text) for r in requests)
    lat = torch.zeros(len(requests), *shape)
    text = torch.zeros(len(requests), text_len, requests[0].text.shape[1])
    for i, r in enumerate(requests):
        lat[i][tuple(slice(0, n) for n in r.latents.shape)] = r.latents
        text[i, :len(r.text)] = r.text
    rotary = None
    if family == "cogvideox":
        frames, _, h, w = shape
        geo = adapter.geometry
        rotary = adapter.pipeline._prepare_rotary_positional_embeddings(
            h * geo.spatial_factor, w * geo.spatial_factor, frames, "cpu")
    return lat, text, torch.stack([r.timestep for r in requests]), rotary


def flops(family: str, model, video_tokens: int, text_tokens: int) -> float:
    """Multiply-adds x2 of the transformer blocks for one request (projections, attention, FFN)."""
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    if family == "wan":
        s, t = video_tokens, text_tokens
        per_block = (2 * 4 * s * d * d + 2 * 2 * s * s * d            # self-attention
                     + 2 * 2 * s * d * d + 2 * 2 * t * d * d + 2 * 2 * s * t * d  # cross-attention
                     + 2 * 2 * s * d * c.ffn_dim)                      # FFN
        return per_block * c.num_layers
    s = video_tokens + text_tokens
    ffn = 4 * d  # diffusers FeedForward default mult
    return (2 * 4 * s * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * ffn) * c.num_layers


def run(family: str, repeats: int) -> None:
    adapter, model, requests = build_batch(family)
    module = adapter.packed_module
    lat, text, ts, rot = padded_inputs(family, adapter, requests)
    with torch.no_grad():
        t_packed = median_seconds(lambda: forward_packed(module, model, requests), repeats)
        t_padded = median_seconds(lambda: _diffusers(family, model, lat, text, ts, rot), repeats)
        t_each = median_seconds(lambda: [_diffusers(family, model, r.latents[None], r.text[None],
                                                  r.timestep.reshape(1), r.rotary) for r in requests], repeats)
    counts = module.token_counts(model, requests)
    video = [n - len(r.text) if family == "cogvideox" else n for n, r in zip(counts, requests)]
    real = sum(flops(family, model, v, len(r.text)) for v, r in zip(video, requests))
    padded_video = module.token_counts(model, [PackedRequest(lat[0], ts[0], text[0])])[0] - (
        text.shape[1] if family == "cogvideox" else 0)
    padded = len(requests) * flops(family, model, padded_video, text.shape[1])
    print(f"\n{family}: {len(requests)} requests, video tokens {video}, text tokens {[len(r.text) for r in requests]}")
    print(f"  packed    {t_packed * 1000:7.2f} ms/step | {real / 1e6:9.2f} MFLOP")
    print(f"  padded    {t_padded * 1000:7.2f} ms/step | {padded / 1e6:9.2f} MFLOP "
          f"({1 - real / padded:.1%} wasted on padding)")
    print(f"  per shape {t_each * 1000:7.2f} ms/step | {real / 1e6:9.2f} MFLOP ({len(requests)} forwards)")
    print(f"  packed vs padded: {t_padded / t_packed:.2f}x faster; packed vs per shape: {t_each / t_packed:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for family in ("cogvideox", "wan"):
        run(family, args.repeats)


if __name__ == "__main__":
    main()
