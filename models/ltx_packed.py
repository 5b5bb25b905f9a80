"""Packed forward of diffusers' `LTXVideoTransformer3DModel` (LTX-Video 0.9.x) over heterogeneous requests.

Follows `LTXVideoTransformer3DModel.forward`, `LTXVideoTransformerBlock.forward` and
`LTXVideoAttnProcessor` of diffusers 0.42 with the batch dimension replaced by packed
rows: per request the latent tokens (`LTXPipeline._pack_latents`), the timestep
embedding (AdaLN-single) and the caption projection; per row the six AdaLN chunks of
its request; self-attention through the attention context with LTX's RoPE over the
whole inner width (the adapter computes each request's table from its frame rate);
cross-attention of each row over its own request's unmasked text (LTX masks padded
text with a -10000 bias, which leaves exactly these keys). An image-to-video row's first
latent frame (`clean_tokens`) is modulated at timestep 0, as `LTXImageToVideoPipeline`
passes `t * (1 - conditioning_mask)` per token.
"""

from __future__ import annotations

import torch
from diffusers import LTXPipeline, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from attention.context import AttentionContext, Segment, gather_rows, per_row, rows_by_request
from models.packed import PackedRequest


def _grid(model: LTXVideoTransformer3DModel, latents: torch.Tensor) -> tuple[int, int, int]:
    p, p_t = model.config.patch_size, model.config.patch_size_t
    _, frames, height, width = latents.shape
    return frames // p_t, height // p, width // p


def token_counts(model: LTXVideoTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    return [f * h * w for f, h, w in (_grid(model, r.latents) for r in requests)]


def forward_rows(model: LTXVideoTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 ) -> tuple[torch.Tensor, list[Segment]]:
    """Output rows (before unpacking) of the tokens this process holds, and which tokens they are."""
    if any(r.rotary is None for r in requests):
        raise ValueError("every LTX row needs its RoPE table (the adapter computes it from the frame rate)")
    counts = token_counts(model, requests)
    segments = ctx.segments(counts)
    held = sorted({s.request for s in segments})
    p, p_t = model.config.patch_size, model.config.patch_size_t
    tokens, cos, sin, tables, final, text = {}, {}, {}, {}, {}, {}
    clean_tables, clean_final = {}, {}  # (clean tokens, value) of image-to-video rows: their frame at timestep 0
    for i in held:
        r = requests[i]
        tokens[i] = model.proj_in(LTXPipeline._pack_latents(r.latents.unsqueeze(0), p, p_t)[0])
        cos[i], sin[i] = r.rotary
        tables[i], final[i] = _modulation(model, r.timestep, tokens[i].dtype)
        if r.clean_tokens:
            clean_table, clean_out = _modulation(model, torch.zeros_like(r.timestep), tokens[i].dtype)
            clean_tables[i], clean_final[i] = (r.clean_tokens, clean_table), (r.clean_tokens, clean_out)
        text[i] = model.caption_projection(r.text.unsqueeze(0))[0]
    x = gather_rows(tokens, segments)
    rope = (gather_rows(cos, segments).unsqueeze(0), gather_rows(sin, segments).unsqueeze(0))

    for block in model.transformer_blocks:
        ada = {i: block.scale_shift_table + table for i, table in tables.items()}
        clean_ada = {i: (n, block.scale_shift_table + table) for i, (n, table) in clean_tables.items()}
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            per_row({i: a[k] for i, a in ada.items()}, segments, {i: (n, a[k]) for i, (n, a) in clean_ada.items()})
            for k in range(6))
        normed = block.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + _self_attention(block.attn1, normed, rope, counts, ctx) * gate_msa
        x = x + _cross_attention(block.attn2, x, text, segments, ctx)
        normed = block.norm2(x) * (1 + scale_mlp) + shift_mlp
        x = x + block.ff(normed) * gate_mlp

    shift = per_row({i: f[0] for i, f in final.items()}, segments, {i: (n, f[0]) for i, (n, f) in clean_final.items()})
    scale = per_row({i: f[1] for i, f in final.items()}, segments, {i: (n, f[1]) for i, (n, f) in clean_final.items()})
    x = model.norm_out(x) * (1 + scale) + shift
    return model.proj_out(x), segments


def _modulation(model: LTXVideoTransformer3DModel, timestep: torch.Tensor, dtype: torch.dtype,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A timestep's AdaLN-single table (6, inner; each block adds its scale_shift_table) and the output norm's
    (2, inner) shift and scale."""
    temb, embedded = model.time_embed(timestep.reshape(1), batch_size=1, hidden_dtype=dtype)
    return temb[0].unflatten(0, (6, -1)), model.scale_shift_table + embedded


def _self_attention(attn, x, rope, counts, ctx):
    q = apply_rotary_emb(attn.norm_q(attn.to_q(x)).unsqueeze(0), rope)[0].unflatten(1, (attn.heads, -1))
    k = apply_rotary_emb(attn.norm_k(attn.to_k(x)).unsqueeze(0), rope)[0].unflatten(1, (attn.heads, -1))
    v = attn.to_v(x).unflatten(1, (attn.heads, -1))
    out = ctx.self_attention(q, k, v, counts).flatten(1)
    return attn.to_out[1](attn.to_out[0](out))


def _cross_attention(attn, x, texts, segments, ctx):
    q = attn.norm_q(attn.to_q(x)).unflatten(1, (attn.heads, -1))
    keys = {i: attn.norm_k(attn.to_k(t)).unflatten(1, (attn.heads, -1)) for i, t in texts.items()}
    values = {i: attn.to_v(t).unflatten(1, (attn.heads, -1)) for i, t in texts.items()}
    out = ctx.cross_attention(q, keys, values, segments).flatten(1)
    return attn.to_out[1](attn.to_out[0](out))


def unpatchify(model: LTXVideoTransformer3DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All output rows of one request -> its velocity prediction (channels, frames, height, width)."""
    f, h, w = _grid(model, request.latents)
    return LTXPipeline._unpack_latents(rows.unsqueeze(0), f, h, w, model.config.patch_size,
                                       model.config.patch_size_t)[0]


def output_rows(model: LTXVideoTransformer3DModel, requests: list[PackedRequest],
                ctx: AttentionContext) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, segments = forward_rows(model, requests, ctx)
    return rows_by_request(rows, segments)
