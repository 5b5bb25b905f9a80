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
passes `t * (1 - conditioning_mask)` per token. The block-level step caches (MagCache,
FirstBlockCache, TeaCache) run through `models.block_caches.run_blocks`.
"""

from __future__ import annotations

import torch
from diffusers import LTXPipeline, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from attention.context import AttentionContext, LocalAttention, Segment, gather_rows, per_row, rows_by_request
from models.block_caches import BlockCaches, RowSubset, run_blocks
from models.packed import PackedRequest


def _grid(model: LTXVideoTransformer3DModel, latents: torch.Tensor) -> tuple[int, int, int]:
    p, p_t = model.config.patch_size, model.config.patch_size_t
    _, frames, height, width = latents.shape
    return frames // p_t, height // p, width // p


def token_counts(model: LTXVideoTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    return [f * h * w for f, h, w in (_grid(model, r.latents) for r in requests)]


def forward_rows(model: LTXVideoTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 caches: BlockCaches | None = None) -> tuple[torch.Tensor, list[Segment]]:
    """Output rows (before unpacking) of the tokens this process holds, and which tokens they are; `caches` (the
    block-level step caches of some rows) is filled on the way."""
    if any(r.rotary is None for r in requests):
        raise ValueError("every LTX row needs its RoPE table (the adapter computes it from the frame rate)")
    counts = token_counts(model, requests)
    segments = ctx.segments(counts)
    held = sorted({s.request for s in segments})
    tokens, cos, sin, tables, final, text = {}, {}, {}, {}, {}, {}
    clean_tables, clean_final = {}, {}  # (clean tokens, value) of image-to-video rows: their frame at timestep 0
    for i in held:
        r = requests[i]
        tokens[i] = _tokens(model, r)
        cos[i], sin[i] = r.rotary
        tables[i], final[i] = _modulation(model, r.timestep, tokens[i].dtype)
        if r.clean_tokens:
            clean_table, clean_out = _modulation(model, torch.zeros_like(r.timestep), tokens[i].dtype)
            clean_tables[i], clean_final[i] = (r.clean_tokens, clean_table), (r.clean_tokens, clean_out)
        text[i] = model.caption_projection(r.text.unsqueeze(0))[0]
    x = gather_rows(tokens, segments)
    rope = (gather_rows(cos, segments), gather_rows(sin, segments))

    def blocks(blocks, x: torch.Tensor, subset: RowSubset | None) -> torch.Tensor:
        row_tables, row_clean, row_rope, row_text = tables, clean_tables, rope, text
        row_counts, row_segments, row_ctx = counts, segments, ctx
        if subset is not None:  # only these rows run the blocks: the same tensors, fewer rows
            row_tables, row_clean, row_text = (subset.of_rows(d) for d in (tables, clean_tables, text))
            row_rope = tuple(subset.of_tokens(t) for t in rope)
            row_counts, row_segments = [counts[i] for i in subset.rows], subset.segments
            row_ctx = ctx.subset(subset.rows)
        for block in blocks:
            x = _block(block, x, row_tables, row_clean, row_text, tuple(t.unsqueeze(0) for t in row_rope),
                       row_counts, row_segments, row_ctx)
        return x

    x = run_blocks(x, segments, len(requests), ctx, caches, lambda x: blocks(model.transformer_blocks[:1], x, None),
                   lambda x, subset: blocks(model.transformer_blocks[1:], x, subset))
    return _head(model, x, final, clean_final, segments), segments


def _tokens(model: LTXVideoTransformer3DModel, request: PackedRequest) -> torch.Tensor:
    """A request's latents packed into tokens and projected to the blocks' width."""
    p, p_t = model.config.patch_size, model.config.patch_size_t
    return model.proj_in(LTXPipeline._pack_latents(request.latents.unsqueeze(0), p, p_t)[0])


def _block(block, x, tables, clean_tables, text, rope, counts, segments, ctx):
    ada = {i: block.scale_shift_table + table for i, table in tables.items()}
    clean_ada = {i: (n, block.scale_shift_table + table) for i, (n, table) in clean_tables.items()}
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        per_row({i: a[k] for i, a in ada.items()}, segments, {i: (n, a[k]) for i, (n, a) in clean_ada.items()})
        for k in range(6))
    normed = block.norm1(x) * (1 + scale_msa) + shift_msa
    x = x + _self_attention(block.attn1, normed, rope, counts, ctx) * gate_msa
    x = x + _cross_attention(block.attn2, x, text, segments, ctx)
    normed = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    return x + block.ff(normed) * gate_mlp


def _head(model: LTXVideoTransformer3DModel, x: torch.Tensor, final: dict[int, torch.Tensor],
          clean_final: dict[int, tuple[int, torch.Tensor]], segments: list[Segment]) -> torch.Tensor:
    """The output norm, modulated per row by its timestep (a clean first frame's at timestep 0), and projection."""
    shift = per_row({i: f[0] for i, f in final.items()}, segments, {i: (n, f[0]) for i, (n, f) in clean_final.items()})
    scale = per_row({i: f[1] for i, f in final.items()}, segments, {i: (n, f[1]) for i, (n, f) in clean_final.items()})
    return model.proj_out(model.norm_out(x) * (1 + scale) + shift)


def timestep_modulation(model: LTXVideoTransformer3DModel, timestep: torch.Tensor) -> torch.Tensor:
    """The AdaLN-single table every block adds its own to (TeaCache's probe)."""
    return _modulation(model, timestep, model.proj_out.weight.dtype)[0]


def skipped_blocks_prediction(model: LTXVideoTransformer3DModel, request: PackedRequest, residual: torch.Tensor,
                              ) -> torch.Tensor:
    """One row's prediction on a step MagCache or TeaCache skips: the token projection and the head run, the blocks'
    output is their input plus `residual` (all the row's tokens, from its last computed step)."""
    x = _tokens(model, request)
    _, final = _modulation(model, request.timestep, x.dtype)
    clean = {}
    if request.clean_tokens:
        clean = {0: (request.clean_tokens, _modulation(model, torch.zeros_like(request.timestep), x.dtype)[1])}
    segments = LocalAttention().segments([len(x)])
    return unpatchify(model, request, _head(model, x + residual.to(x.dtype), {0: final}, clean, segments))


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


def output_rows(model: LTXVideoTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                caches: BlockCaches | None = None) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, segments = forward_rows(model, requests, ctx, caches)
    return rows_by_request(rows, segments)
