"""Packed forward of diffusers' `MochiTransformer3DModel` (Mochi 1) over heterogeneous requests.

Follows `MochiTransformer3DModel.forward`, `MochiTransformerBlock.forward` and
`MochiAttnProcessor2_0` of diffusers 0.42. Mochi is asymmetric: video tokens (width
`dim`) and text tokens (width `pooled_projection_dim`) have their own weights and
meet only in the joint attention over [video; valid text] of each request. Only a
request's unmasked text tokens enter (`PackedRequest.text` holds just those), which
is what diffusers' per-sample loop over the attention mask computes; the padded
text rows it also carries never reach the video output.
"""

from __future__ import annotations

import torch
from diffusers import MochiTransformer3DModel

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


def _grid(model: MochiTransformer3DModel, latents: torch.Tensor) -> tuple[int, int, int]:
    p = model.config.patch_size
    _, frames, height, width = latents.shape
    return frames, height // p, width // p


def video_token_counts(model: MochiTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    return [f * h * w for f, h, w in (_grid(model, r.latents) for r in requests)]


def token_counts(model: MochiTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    """Joint sequence length of every request: its video tokens plus its valid text tokens."""
    return [v + len(r.text) for v, r in zip(video_token_counts(model, requests), requests)]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's interleaved RoPE (`MochiAttnProcessor2_0.apply_rotary_emb`), rows first."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], -1).flatten(-2)


def forward_rows(model: MochiTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 ) -> tuple[torch.Tensor, JointLayout]:
    """Video output rows (before unpatchify) of the joint tokens this process holds."""
    n_video = video_token_counts(model, requests)
    counts = token_counts(model, requests)
    layout, held = held_joint_layout(ctx, counts, n_video, requests[0].latents.device)
    dtype = model.proj_out.weight.dtype
    patches, texts, temb, cos, sin = {}, {}, {}, {}, {}
    for i in held:
        r = requests[i]
        frames, h, w = _grid(model, r.latents)
        mask = torch.ones(1, len(r.text), dtype=torch.bool, device=r.text.device)
        t, caption = model.time_embed(r.timestep.reshape(1), r.text.unsqueeze(0), mask, hidden_dtype=dtype)
        temb[i], texts[i] = t[0], caption[0]
        patches[i] = model.patch_embed(r.latents.unsqueeze(0).permute(0, 2, 1, 3, 4).flatten(0, 1)).flatten(0, 1)
        c, s = model.rope(model.pos_frequencies, frames, h, w, device=r.latents.device, dtype=torch.float32)
        cos[i], sin[i] = c, s
    x, c = gather_pieces(patches, layout.video), gather_pieces(texts, layout.text)
    rope = gather_pieces(cos, layout.video), gather_pieces(sin, layout.video)
    for block in model.transformer_blocks:
        x, c = _block(block, x, c, temb, rope, counts, layout, ctx)
    return modulated_output(model, x, temb, layout), layout


def _block(block, x, c, temb, rope, counts, layout, ctx):
    mod = expand_pieces({i: block.norm1.linear(block.norm1.silu(t)) for i, t in temb.items()}, layout.video)
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
    normed_x = (block.norm1.norm(x.float()) * (1 + scale_msa.float())).to(x.dtype)
    if block.context_pre_only:
        scale = expand_pieces({i: block.norm1_context.linear_1(block.norm1_context.silu(t).to(c.dtype))
                               for i, t in temb.items()}, layout.text)
        normed_c = block.norm1_context.norm(c, 1 + scale.float()).to(c.dtype)
    else:
        mod_c = expand_pieces({i: block.norm1_context.linear(block.norm1_context.silu(t)) for i, t in temb.items()},
                              layout.text)
        enc_scale_msa, enc_gate_msa, enc_scale_mlp, enc_gate_mlp = mod_c.chunk(4, dim=1)
        normed_c = (block.norm1_context.norm(c.float()) * (1 + enc_scale_msa.float())).to(c.dtype)

    attn_x, attn_c = _joint_attention(block.attn1, normed_x, normed_c, rope, counts, layout, ctx)
    x = x + block.norm2(attn_x, torch.tanh(gate_msa))
    x = x + block.norm4(block.ff(block.norm3(x, 1 + scale_mlp.float())), torch.tanh(gate_mlp))
    if not block.context_pre_only:
        c = c + block.norm2_context(attn_c, torch.tanh(enc_gate_msa))
        c = c + block.norm4_context(block.ff_context(block.norm3_context(c, 1 + enc_scale_mlp.float())),
                                    torch.tanh(enc_gate_mlp))
    return x, c


def _joint_attention(attn, x, c, rope, counts, layout: JointLayout, ctx):
    heads = attn.heads
    q = _rope(attn.norm_q(attn.to_q(x).unflatten(1, (heads, -1))), *rope)
    k = _rope(attn.norm_k(attn.to_k(x).unflatten(1, (heads, -1))), *rope)
    v = attn.to_v(x).unflatten(1, (heads, -1))
    cq = attn.norm_added_q(attn.add_q_proj(c).unflatten(1, (heads, -1)))
    ck = attn.norm_added_k(attn.add_k_proj(c).unflatten(1, (heads, -1)))
    cv = attn.add_v_proj(c).unflatten(1, (heads, -1))
    out = ctx.self_attention(layout.join(q, cq), layout.join(k, ck), layout.join(v, cv), counts).flatten(1)
    out_x, out_c = layout.split(out)
    out_x = attn.to_out[1](attn.to_out[0](out_x))
    return out_x, (attn.to_add_out(out_c) if hasattr(attn, "to_add_out") else out_c)


def unpatchify(model: MochiTransformer3DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All video output rows of one request -> its prediction (channels, frames, height, width)."""
    frames, h, w = _grid(model, request.latents)
    p = model.config.patch_size
    out = rows.reshape(frames, h, w, p, p, -1).permute(5, 0, 1, 3, 2, 4)
    return out.reshape(-1, frames, h * p, w * p)


def output_rows(model: MochiTransformer3DModel, requests: list[PackedRequest],
                ctx: AttentionContext) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, layout = forward_rows(model, requests, ctx)
    return video_rows_by_request(rows, layout)
