"""Packed forward of diffusers' `HunyuanVideo15Transformer3DModel` (HunyuanVideo 1.5) over heterogeneous requests.

Follows `HunyuanVideo15Transformer3DModel.forward`, `HunyuanVideo15TransformerBlock.forward` and
`HunyuanVideo15AttnProcessor2_0` of diffusers 0.42. HunyuanVideo 1.5 is dual-stream:
video tokens and condition tokens have their own weights (`norm1` / `norm1_context`,
`ff` / `ff_context`) and meet only in the joint attention over [video; condition] of
each request. A request's condition tokens are, in diffusers' order, its image tokens
(image-to-video), its ByT5 glyph tokens and its refined Qwen2.5-VL tokens, valid ones
only: diffusers pads the three to fixed lengths and masks the padding out of every
attention, so the valid tokens are all that reaches the video output. The token refiner
of the text (`context_embedder`) attends over the valid tokens only and pools their
mean, which is what its masked mean and masked attention compute.
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from attention.context import AttentionContext
from models.packed import (
    JointLayout,
    PackedRequest,
    expand_pieces,
    gather_pieces,
    held_joint_layout,
    modulated_output,
    video_rows_by_request,
)

MLLM, GLYPH, IMAGE = 0, 1, 2
"""`cond_type_embed` rows of the three kinds of condition token."""


def _grid(model: HunyuanVideo15Transformer3DModel, latents: torch.Tensor) -> tuple[int, int, int]:
    p, p_t = model.config.patch_size, model.config.patch_size_t
    _, frames, height, width = latents.shape
    return frames // p_t, height // p, width // p


def condition_token_count(request: PackedRequest) -> int:
    """The request's valid image, glyph and text tokens."""
    image = 0 if request.image is None else len(request.image)
    glyph = 0 if request.glyph is None else len(request.glyph)
    return image + glyph + len(request.text)


def video_token_counts(model: HunyuanVideo15Transformer3DModel, requests: list[PackedRequest]) -> list[int]:
    return [f * h * w for f, h, w in (_grid(model, r.latents) for r in requests)]


def token_counts(model: HunyuanVideo15Transformer3DModel, requests: list[PackedRequest]) -> list[int]:
    """Joint sequence length of every request: its video tokens plus its valid condition tokens."""
    return [v + condition_token_count(r) for v, r in zip(video_token_counts(model, requests), requests)]


def _condition_tokens(model: HunyuanVideo15Transformer3DModel, r: PackedRequest) -> torch.Tensor:
    """[image; glyph; refined text] tokens of one request, each with its condition-type embedding."""
    timestep = r.timestep.reshape(1)
    pieces = []
    if r.image is not None:
        pieces.append(_typed(model, model.image_embedder(r.image.unsqueeze(0))[0], IMAGE))
    if r.glyph is not None and len(r.glyph):
        pieces.append(_typed(model, model.context_embedder_2(r.glyph.unsqueeze(0))[0], GLYPH))
    pieces.append(_typed(model, model.context_embedder(r.text.unsqueeze(0), timestep, None)[0], MLLM))
    return torch.cat(pieces)


def _typed(model: HunyuanVideo15Transformer3DModel, tokens: torch.Tensor, kind: int) -> torch.Tensor:
    return tokens + model.cond_type_embed(torch.full((len(tokens),), kind, dtype=torch.long, device=tokens.device))


def forward_rows(model: HunyuanVideo15Transformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 ) -> tuple[torch.Tensor, JointLayout]:
    """Video output rows (before unpatchify) of the joint tokens this process holds."""
    n_video = video_token_counts(model, requests)
    counts = token_counts(model, requests)
    layout, held = held_joint_layout(ctx, counts, n_video, requests[0].latents.device)
    patches, conditions, temb, cos, sin = {}, {}, {}, {}, {}
    for i in held:
        r = requests[i]
        latents = r.latents.unsqueeze(0)
        temb[i] = model.time_embed(r.timestep.reshape(1))[0]
        patches[i] = model.x_embedder(latents)[0]
        conditions[i] = _condition_tokens(model, r)
        cos[i], sin[i] = model.rope(latents)
    x, c = gather_pieces(patches, layout.video), gather_pieces(conditions, layout.text)
    rope = gather_pieces(cos, layout.video), gather_pieces(sin, layout.video)
    for block in model.transformer_blocks:
        x, c = _block(block, x, c, temb, rope, counts, layout, ctx)
    return modulated_output(model, x, temb, layout), layout


def _modulation(norm, temb: dict[int, torch.Tensor], pieces: list[tuple[int, slice]]) -> list[torch.Tensor]:
    """`AdaLayerNormZero`'s six per-request vectors, expanded over the request's rows of one stream."""
    return list(expand_pieces({i: norm.linear(norm.silu(t)) for i, t in temb.items()}, pieces).chunk(6, dim=1))


def _block(block, x, c, temb, rope, counts, layout: JointLayout, ctx: AttentionContext):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, temb, layout.video)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
        block.norm1_context, temb, layout.text)
    normed_x = block.norm1.norm(x) * (1 + scale_msa) + shift_msa
    normed_c = block.norm1_context.norm(c) * (1 + c_scale_msa) + c_shift_msa
    attn_x, attn_c = _joint_attention(block.attn, normed_x, normed_c, rope, counts, layout, ctx)
    x = x + attn_x * gate_msa
    c = c + attn_c * c_gate_msa
    x = x + gate_mlp * block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
    c = c + c_gate_mlp * block.ff_context(block.norm2_context(c) * (1 + c_scale_mlp) + c_shift_mlp)
    return x, c


def _joint_attention(attn, x, c, rope, counts, layout: JointLayout, ctx: AttentionContext):
    heads = attn.heads
    q = apply_rotary_emb(attn.norm_q(attn.to_q(x).unflatten(1, (heads, -1))).unsqueeze(0), rope, sequence_dim=1)[0]
    k = apply_rotary_emb(attn.norm_k(attn.to_k(x).unflatten(1, (heads, -1))).unsqueeze(0), rope, sequence_dim=1)[0]
    v = attn.to_v(x).unflatten(1, (heads, -1))
    cq = attn.norm_added_q(attn.add_q_proj(c).unflatten(1, (heads, -1)))
    ck = attn.norm_added_k(attn.add_k_proj(c).unflatten(1, (heads, -1)))
    cv = attn.add_v_proj(c).unflatten(1, (heads, -1))
    out = ctx.self_attention(layout.join(q, cq), layout.join(k, ck), layout.join(v, cv), counts).flatten(1)
    out_x, out_c = layout.split(out)
    return attn.to_out[1](attn.to_out[0](out_x)), attn.to_add_out(out_c)


def unpatchify(model: HunyuanVideo15Transformer3DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All video output rows of one request -> its prediction (channels, frames, height, width)."""
    frames, h, w = _grid(model, request.latents)
    p, p_t = model.config.patch_size, model.config.patch_size_t
    out = rows.reshape(frames, h, w, -1, p_t, p, p).permute(3, 0, 4, 1, 5, 2, 6)
    return out.reshape(-1, frames * p_t, h * p, w * p)


def output_rows(model: HunyuanVideo15Transformer3DModel, requests: list[PackedRequest],
                ctx: AttentionContext) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, layout = forward_rows(model, requests, ctx)
    return video_rows_by_request(rows, layout)
