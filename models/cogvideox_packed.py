"""Packed forward of diffusers' `CogVideoXTransformer3DModel` (CogVideoX 1.0 and 1.5 T2V) over heterogeneous requests.

Follows `CogVideoXTransformer3DModel.forward`, `CogVideoXBlock.forward` and
`CogVideoXAttnProcessor2_0` of diffusers 0.42. Each request is one joint sequence
[text tokens; video tokens]; its tokens may be sharded over a ring like any other
sequence. Text and video rows share every weight but take different AdaLN-Zero
modulations (CogVideoXLayerNormZero's enc_* vs video chunks), chosen per row; RoPE
(5b-style, when the request carries it) applies to video rows only (text rows get
cos 1 / sin 0, an exact identity). CogVideoX 1.5 patches pairs of latent frames
(`patch_size_t` 2; the adapter pads the latents to an even count as the pipeline does).
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from attention.context import AttentionContext, LocalAttention, Segment, gather_rows, per_row, rows_by_request
from models.block_caches import BlockCaches, RowSubset, run_blocks
from models.packed import PackedRequest


def _video_tokens(model: CogVideoXTransformer3DModel, latents: torch.Tensor) -> int:
    frames, _, height, width = latents.shape
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    return (frames // p_t) * (height // p) * (width // p)


def token_counts(model: CogVideoXTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    """Joint sequence length of every request: its text tokens plus its video tokens."""
    return [len(r.text) + _video_tokens(model, r.latents) for r in requests]


def _joint_rope(request: PackedRequest, video_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    text = len(request.text)
    cos = torch.ones(text + video_tokens, head_dim, dtype=torch.float32, device=request.latents.device)
    sin = torch.zeros_like(cos)
    if request.rotary is not None:
        cos[text:], sin[text:] = request.rotary
    return cos, sin


I2V_OFS = 2.0
"""The offset `CogVideoXImageToVideoPipeline` feeds CogVideoX 1.5 I2V's `ofs` embedding (one value, every step)."""


def _ofs_embedding(model: CogVideoXTransformer3DModel, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    ofs = model.ofs_proj(torch.full((1,), I2V_OFS, device=device)).to(dtype)
    return model.ofs_embedding(ofs)[0]


def _embeddings(model: CogVideoXTransformer3DModel, r: PackedRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's joint rows ([text; video] patch embedding) and its timestep embedding."""
    embeds = model.embedding_dropout(model.patch_embed(r.text.unsqueeze(0), r.latents.unsqueeze(0)))[0]
    return embeds, timestep_modulation(model, r.timestep)


def timestep_modulation(model: CogVideoXTransformer3DModel, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep embedding every block's AdaLN is computed from (TeaCache's probe, TeaCache4CogVideoX's emb)."""
    dtype = model.proj_out.weight.dtype
    temb = model.time_embedding(model.time_proj(timestep.reshape(1)).to(dtype=dtype), None)[0]
    if model.ofs_embedding is not None:  # CogVideoX1.5-5B-I2V: the pipeline's constant offset, every row
        temb = temb + _ofs_embedding(model, dtype, temb.device)
    return temb


def forward_rows(model: CogVideoXTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 caches: BlockCaches | None = None) -> tuple[torch.Tensor, list[Segment]]:
    """Output rows of the joint tokens this process holds (text rows are discarded by `unpatchify`) and which tokens
    they are; `caches` (the block-level step caches of some rows) is filled on the way. FirstBlockCache measures
    the first block's residual over video rows, as diffusers' hook does (CogVideoXBlock's `hidden_states`)."""
    counts = token_counts(model, requests)
    segments = ctx.segments(counts)
    head_dim = model.config.attention_head_dim
    embeds, temb, is_text, cos, sin = {}, {}, {}, {}, {}
    for i in sorted({s.request for s in segments}):  # a rank embeds only the requests it holds
        r = requests[i]
        embeds[i], temb[i] = _embeddings(model, r)
        is_text[i] = torch.arange(counts[i], device=embeds[i].device) < len(r.text)
        cos[i], sin[i] = _joint_rope(r, counts[i] - len(r.text), head_dim)
    x = gather_rows(embeds, segments)
    text_rows = gather_rows(is_text, segments).unsqueeze(1)
    rope = (gather_rows(cos, segments), gather_rows(sin, segments))

    def blocks(blocks, x, subset: RowSubset | None) -> torch.Tensor:
        times, row_text, row_rope, row_counts, row_segments, row_ctx = temb, text_rows, rope, counts, segments, ctx
        if subset is not None:  # only these rows run the blocks: the same tensors, fewer rows
            times, row_text = subset.of_rows(temb), subset.of_tokens(text_rows)
            row_rope = tuple(subset.of_tokens(t) for t in rope)
            row_counts, row_segments = [counts[i] for i in subset.rows], subset.segments
            row_ctx = ctx.subset(subset.rows)
        for block in blocks:
            x = _block(block, x, times, row_text, row_rope, row_counts, row_segments, row_ctx)
        return x

    x = run_blocks(x, segments, len(requests), ctx, caches, lambda x: blocks(model.transformer_blocks[:1], x, None),
                   lambda x, subset: blocks(model.transformer_blocks[1:], x, subset), measured=~text_rows[:, 0])
    return _head(model, x, temb, segments), segments


def _block(block, x, temb, text_rows, rope, counts, segments, ctx):
    mod = per_row({i: block.norm1.linear(block.norm1.silu(t)) for i, t in temb.items()}, segments)
    normed, gate = _modulate(block.norm1.norm, x, mod, text_rows)
    x = x + gate * _attention(block.attn1, normed, rope, counts, ctx)
    mod = per_row({i: block.norm2.linear(block.norm2.silu(t)) for i, t in temb.items()}, segments)
    normed, gate = _modulate(block.norm2.norm, x, mod, text_rows)
    return x + gate * block.ff(normed)


def _head(model: CogVideoXTransformer3DModel, x: torch.Tensor, temb: dict[int, torch.Tensor],
          segments: list[Segment]) -> torch.Tensor:
    """The final norm, the output norm modulated per row and the projection after the blocks (per token, so a
    video row's output does not depend on the text rows beside it)."""
    x = model.norm_final(x)
    shift, scale = per_row({i: model.norm_out.linear(model.norm_out.silu(t)) for i, t in temb.items()},
                           segments).chunk(2, dim=1)
    return model.proj_out(model.norm_out.norm(x) * (1 + scale) + shift)


def skipped_blocks_prediction(model: CogVideoXTransformer3DModel, request: PackedRequest, residual: torch.Tensor,
                              ) -> torch.Tensor:
    """One row's prediction on a step MagCache or TeaCache skips: the embeddings and the head run, the blocks'
    output is their input plus `residual` (the row's joint tokens, from its last computed step; its video tokens
    are what diffusers' `MagCacheHeadHook` adds, its text tokens never reach the prediction)."""
    embeds, temb = _embeddings(model, request)
    segments = LocalAttention().segments([len(embeds)])
    return unpatchify(model, request, _head(model, embeds + residual.to(embeds.dtype), {0: temb}, segments))


def _modulate(norm, x, mod, text_rows):
    """CogVideoXLayerNormZero per row: video chunks for video rows, enc_* chunks for text rows."""
    shift, scale, gate, enc_shift, enc_scale, enc_gate = mod.chunk(6, dim=1)
    pick = lambda video, text: torch.where(text_rows, text, video)  # noqa: E731
    return norm(x) * (1 + pick(scale, enc_scale)) + pick(shift, enc_shift), pick(gate, enc_gate)


def _attention(attn, x, rope, counts, ctx):
    heads = attn.heads
    q = attn.to_q(x).unflatten(1, (heads, -1))
    k = attn.to_k(x).unflatten(1, (heads, -1))
    v = attn.to_v(x).unflatten(1, (heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q = apply_rotary_emb(q.unsqueeze(0), rope, sequence_dim=1)[0]
    k = apply_rotary_emb(k.unsqueeze(0), rope, sequence_dim=1)[0]
    out = ctx.self_attention(q, k, v, counts).flatten(1)
    return attn.to_out[1](attn.to_out[0](out))


def unpatchify(model: CogVideoXTransformer3DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All joint output rows of one request -> its noise prediction (frames, channels, height, width)."""
    frames, _, height, width = request.latents.shape
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    video = rows[len(request.text):].reshape(frames // p_t, height // p, width // p, -1, p_t, p, p)
    return video.permute(0, 4, 3, 1, 5, 2, 6).flatten(5, 6).flatten(3, 4).flatten(0, 1)


def output_rows(model: CogVideoXTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                caches: BlockCaches | None = None) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, segments = forward_rows(model, requests, ctx, caches)
    return rows_by_request(rows, segments)
