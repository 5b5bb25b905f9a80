"""Packed forward of diffusers' `SD3Transformer2DModel` (SD3 / SD3.5, MMDiT) over heterogeneous requests.

Follows `SD3Transformer2DModel.forward`, `JointTransformerBlock.forward` and
`JointAttnProcessor2_0` of diffusers 0.42. Image and text tokens are two streams
with their own weights (AdaLN-Zero modulations, projections, FFNs), joined in one
attention over [image; text] per request; the last block is `context_pre_only`
(text is read, not updated). SD3.5's dual-attention blocks add a second,
image-only self-attention (`attn2`), run per request over its image tokens.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from attention.context import AttentionContext, LocalAttention
from models.packed import (
    JointLayout,
    PackedRequest,
    expand_pieces,
    gather_pieces,
    held_joint_layout,
    modulated_output,
    video_rows_by_request,
)


def image_token_counts(model: SD3Transformer2DModel, requests: list[PackedRequest]) -> list[int]:
    p = model.config.patch_size
    return [(r.latents.shape[-2] // p) * (r.latents.shape[-1] // p) for r in requests]


def token_counts(model: SD3Transformer2DModel, requests: list[PackedRequest]) -> list[int]:
    """Joint sequence length of every request: image patches plus text tokens."""
    return [n + len(r.text) for n, r in zip(image_token_counts(model, requests), requests)]


def forward_rows(model: SD3Transformer2DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 ) -> tuple[torch.Tensor, JointLayout]:
    """Image output rows (before unpatchify) of the joint tokens this process holds."""
    n_image = image_token_counts(model, requests)
    counts = token_counts(model, requests)
    layout, held = held_joint_layout(ctx, counts, n_image, requests[0].latents.device)
    whole = [tokens.stop - tokens.start for _, tokens in layout.video]
    if any(b.attn2 is not None for b in model.transformer_blocks) and whole != [n_image[r] for r, _ in layout.video]:
        raise NotImplementedError("SD3.5 dual-attention blocks need each request's image tokens whole on one rank "
                                  "(the adapter reports shardable=False, so the planner keeps them on 1-rank rings)")
    patches, texts, temb = {}, {}, {}
    for i in held:
        r = requests[i]
        patches[i] = model.pos_embed(r.latents.unsqueeze(0))[0]
        temb[i] = model.time_text_embed(r.timestep.reshape(1), r.pooled.unsqueeze(0))[0]
        texts[i] = model.context_embedder(r.text)
    x, c = gather_pieces(patches, layout.video), gather_pieces(texts, layout.text)
    for block in model.transformer_blocks:
        x, c = _block(block, x, c, temb, counts, whole, layout, ctx)
    return modulated_output(model, x, temb, layout), layout


def _block(block, x, c, temb, counts, held_images, layout, ctx):
    mod = expand_pieces({i: block.norm1.linear(block.norm1.silu(t)) for i, t in temb.items()}, layout.video)
    chunks = mod.chunk(9 if block.use_dual_attention else 6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
    normed = block.norm1.norm(x)
    normed_x = normed * (1 + scale_msa) + shift_msa
    if block.context_pre_only:
        scale, shift = expand_pieces({i: block.norm1_context.linear(block.norm1_context.silu(t).to(c.dtype))
                                      for i, t in temb.items()}, layout.text).chunk(2, dim=1)
        normed_c = block.norm1_context.norm(c) * (1 + scale) + shift
    else:
        mod_c = expand_pieces({i: block.norm1_context.linear(block.norm1_context.silu(t)) for i, t in temb.items()},
                              layout.text)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod_c.chunk(6, dim=1)
        normed_c = block.norm1_context.norm(c) * (1 + c_scale_msa) + c_shift_msa

    attn_x, attn_c = _joint_attention(block.attn, normed_x, normed_c, counts, layout, ctx)
    x = x + gate_msa * attn_x
    if block.use_dual_attention:
        shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
        x = x + gate_msa2 * _image_attention(block.attn2, normed * (1 + scale_msa2) + shift_msa2, held_images)
    x = x + gate_mlp * block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
    if block.context_pre_only:
        return x, c
    c = c + c_gate_msa * attn_c
    c = c + c_gate_mlp * block.ff_context(block.norm2_context(c) * (1 + c_scale_mlp) + c_shift_mlp)
    return x, c


def _heads(attn, x, proj, norm):
    out = proj(x).unflatten(1, (attn.heads, -1))
    return norm(out) if norm is not None else out


def _joint_attention(attn, x, c, counts, layout: JointLayout, ctx):
    q = layout.join(_heads(attn, x, attn.to_q, attn.norm_q), _heads(attn, c, attn.add_q_proj, attn.norm_added_q))
    k = layout.join(_heads(attn, x, attn.to_k, attn.norm_k), _heads(attn, c, attn.add_k_proj, attn.norm_added_k))
    v = layout.join(_heads(attn, x, attn.to_v, None), _heads(attn, c, attn.add_v_proj, None))
    out_x, out_c = layout.split(ctx.self_attention(q, k, v, counts).flatten(1))
    out_x = attn.to_out[1](attn.to_out[0](out_x))
    return out_x, (out_c if attn.context_pre_only else attn.to_add_out(out_c))


def _image_attention(attn, x, held_images):
    """SD3.5's attn2: each request's image tokens over themselves, here (the requests are whole on this rank)."""
    q, k, v = (_heads(attn, x, proj, norm) for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k),
                                                              (attn.to_v, None)))
    return attn.to_out[1](attn.to_out[0](LocalAttention().self_attention(q, k, v, held_images).flatten(1)))


def unpatchify(model: SD3Transformer2DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All image output rows of one request -> its prediction (channels, height, width)."""
    p = model.config.patch_size
    h, w = request.latents.shape[-2] // p, request.latents.shape[-1] // p
    out = rows.reshape(h, w, p, p, model.out_channels)
    return torch.einsum("hwpqc->chpwq", out).reshape(model.out_channels, h * p, w * p)


def output_rows(model: SD3Transformer2DModel, requests: list[PackedRequest],
                ctx: AttentionContext) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, layout = forward_rows(model, requests, ctx)
    return video_rows_by_request(rows, layout)
