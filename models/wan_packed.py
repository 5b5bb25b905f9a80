"""Packed forward of diffusers' `WanTransformer3DModel` (Wan 2.1 / 2.2, T2V and I2V) over heterogeneous requests.

Follows `WanTransformer3DModel.forward` and `WanTransformerBlock.forward` of
diffusers 0.42 step by step, with the batch dimension replaced by packed rows:
per-request patch embedding, RoPE and condition embedding (diffusers' own
submodules, called per request), per-row timestep modulation, self-attention via
the attention context, cross-attention of each row over its own request's text
(and, for Wan 2.1 I2V, over its image's CLIP tokens with the block's added K/V
projections, summed as `WanAttnProcessor` sums them), and per-request unpatchify.
A TI2V-5B image-to-video row's first latent frame (`clean_tokens`) is modulated at
timestep 0, as `WanImageToVideoPipeline` passes per-token timesteps with `expand_timesteps`.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from attention.context import AttentionContext, LocalAttention, Segment, gather_rows, per_row, rows_by_request
from models.block_caches import BlockCaches, RowSubset, run_blocks
from models.packed import PackedRequest


def _grid(model: WanTransformer3DModel, latents: torch.Tensor) -> tuple[int, int, int]:
    p_t, p_h, p_w = model.config.patch_size
    _, frames, height, width = latents.shape
    return frames // p_t, height // p_h, width // p_w


def token_counts(model: WanTransformer3DModel, requests: list[PackedRequest]) -> list[int]:
    counts = []
    for r in requests:
        f, h, w = _grid(model, r.latents)
        counts.append(f * h * w)
    return counts


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE (`WanAttnProcessor.__call__.apply_rotary_emb`), rows first."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _embeddings(model: WanTransformer3DModel, r: PackedRequest) -> dict[str, torch.Tensor | None]:
    """One request's patch rows and condition embeddings (diffusers' own submodules on a batch of one)."""
    if (r.image is None) != (model.condition_embedder.image_embedder is None):
        raise ValueError("Wan 2.1 I2V rows need their image's CLIP tokens, and other Wan rows take none")
    sample = r.latents.unsqueeze(0)
    t, p, txt, img = model.condition_embedder(r.timestep.reshape(1), r.text.unsqueeze(0),
                                              None if r.image is None else r.image.unsqueeze(0))
    out = {"patches": model.patch_embedding(sample).flatten(2).transpose(1, 2)[0], "temb": t[0],
           "proj": p[0].unflatten(0, (6, -1)), "text": txt[0], "image": None if img is None else img[0],
           "clean_temb": None, "clean_proj": None}
    if r.clean_tokens:
        t0, p0, _, _ = model.condition_embedder(torch.zeros_like(r.timestep).reshape(1), r.text.unsqueeze(0), None)
        out["clean_temb"], out["clean_proj"] = t0[0], p0[0].unflatten(0, (6, -1))
    return out


def forward_rows(model: WanTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                 caches: BlockCaches | None = None) -> tuple[torch.Tensor, list[Segment]]:
    """Output rows (before unpatchify) of the tokens this process holds, and which tokens they are; `caches` (the
    block-level step caches of some rows) is filled on the way."""
    counts = token_counts(model, requests)
    segments = ctx.segments(counts)
    held = sorted({s.request for s in segments})  # a rank computes only its requests' embeddings
    patches, cos, sin, temb, proj, text, image = {}, {}, {}, {}, {}, {}, {}
    clean_temb, clean_proj = {}, {}  # image first frames: (clean tokens, embedding at timestep 0)
    for i in held:
        r = requests[i]
        c, s = model.rope(r.latents.unsqueeze(0))
        cos[i], sin[i] = c[0], s[0]  # (tokens, 1, head_dim)
        e = _embeddings(model, r)
        patches[i], temb[i], proj[i], text[i] = e["patches"], e["temb"], e["proj"], e["text"]
        if e["image"] is not None:
            image[i] = e["image"]
        if r.clean_tokens:
            clean_temb[i], clean_proj[i] = (r.clean_tokens, e["clean_temb"]), e["clean_proj"]
    x = gather_rows(patches, segments)
    rope_cos, rope_sin = gather_rows(cos, segments), gather_rows(sin, segments)
    row_temb = per_row(temb, segments, clean_temb)
    # The blocks' AdaLN tables stay per request (and per clean frame); each chunk is spread over the rows only when it
    # is used (six fp32 chunks per row at once would be 12x the size of x: 23 GB for a 187k-token pack of Wan-14B).
    tables = [proj[i] for i in held] + [clean_proj[i] for i in clean_proj]
    proj_stack = torch.stack(tables)
    row_request = _row_tables(held, list(clean_proj), {i: n for i, (n, _) in clean_temb.items()}, segments).to(x.device)

    def first_block(x: torch.Tensor) -> torch.Tensor:
        return _block(model.blocks[0], x, text, image, proj_stack, row_request, rope_cos, rope_sin, counts, segments,
                      ctx)

    def other_blocks(x: torch.Tensor, subset: RowSubset | None) -> torch.Tensor:
        texts, images, table_of_row, cos_rows, sin_rows = text, image, row_request, rope_cos, rope_sin
        row_counts, row_segments, row_ctx = counts, segments, ctx
        if subset is not None:  # only these rows run the blocks: the same tensors, fewer rows
            texts, images = subset.of_rows(text), subset.of_rows(image)
            table_of_row, cos_rows, sin_rows = (subset.of_tokens(t) for t in (row_request, rope_cos, rope_sin))
            row_counts, row_segments = [counts[i] for i in subset.rows], subset.segments
            row_ctx = ctx.subset(subset.rows)
        for block in model.blocks[1:]:
            x = _block(block, x, texts, images, proj_stack, table_of_row, cos_rows, sin_rows, row_counts,
                       row_segments, row_ctx)
        return x

    x = run_blocks(x, segments, len(requests), ctx, caches, first_block, other_blocks)
    return _head(model, x, row_temb), segments


def _head(model: WanTransformer3DModel, x: torch.Tensor, row_temb: torch.Tensor) -> torch.Tensor:
    """The output norm (modulated per row) and projection after the blocks."""
    shift, scale = (model.scale_shift_table + row_temb.unsqueeze(1)).chunk(2, dim=1)
    x = (model.norm_out(x.float()) * (1 + scale[:, 0]) + shift[:, 0]).type_as(x)
    return model.proj_out(x)


def timestep_modulation(model: WanTransformer3DModel, timestep: torch.Tensor) -> torch.Tensor:
    """The time projection every block's AdaLN table adds to (TeaCache's probe, TeaCache4Wan2.1's e0); the text the
    condition embedder also projects does not enter it."""
    no_text = model.proj_out.weight.new_zeros(1, 1, model.config.text_dim)
    _, projection, _, _ = model.condition_embedder(timestep.reshape(1), no_text, None)
    return projection[0]


def skipped_blocks_prediction(model: WanTransformer3DModel, request: PackedRequest, residual: torch.Tensor,
                              ) -> torch.Tensor:
    """One row's prediction on a step MagCache or TeaCache skips (`MagCacheHeadHook`): the embeddings and the head
    run, the blocks' output is their input plus `residual` (all the row's tokens, from its last computed step)."""
    e = _embeddings(model, request)
    (segment,) = LocalAttention().segments(token_counts(model, [request]))
    clean = {0: (request.clean_tokens, e["clean_temb"])} if request.clean_tokens else {}
    row_temb = per_row({0: e["temb"]}, [segment], clean)
    return unpatchify(model, request, _head(model, e["patches"] + residual.to(e["patches"].dtype), row_temb))


def _row_tables(held: list[int], clean: list[int], clean_tokens: dict[int, int], segments: list[Segment],
                ) -> torch.Tensor:
    """Per row, its AdaLN table's index: request i's (its position in `held`), or for its first clean_tokens[i]
    tokens its clean frame's (after all the requests', in `clean` order)."""
    values, counts = [], []
    for s in segments:
        head = s.head(clean_tokens.get(s.request, 0))
        if head:
            values.append(len(held) + clean.index(s.request))
            counts.append(head)
        values.append(held.index(s.request))
        counts.append(s.length - head)
    return torch.repeat_interleave(torch.tensor(values), torch.tensor(counts))


def _block(block, x, texts, images, proj_stack, row_request, cos, sin, counts, segments, ctx):
    tables = block.scale_shift_table + proj_stack.float()  # (requests held, 6, hidden)

    def modulation(chunk: int) -> torch.Tensor:  # shift, scale, gate, c_shift, c_scale, c_gate: one per row
        return tables[:, chunk].index_select(0, row_request)

    attn = block.attn1
    normed = (block.norm1(x.float()) * (1 + modulation(1)) + modulation(0)).type_as(x)
    q = attn.norm_q(attn.to_q(normed)).unflatten(1, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(normed)).unflatten(1, (attn.heads, -1))
    v = attn.to_v(normed).unflatten(1, (attn.heads, -1))
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    out = ctx.self_attention(q, k, v, counts).flatten(1)
    x = (x.float() + attn.to_out[1](attn.to_out[0](out)) * modulation(2)).type_as(x)

    attn = block.attn2
    normed = block.norm2(x.float()).type_as(x)
    q = attn.norm_q(attn.to_q(normed)).unflatten(1, (attn.heads, -1))
    keys = {i: attn.norm_k(attn.to_k(t)).unflatten(1, (attn.heads, -1)) for i, t in texts.items()}
    values = {i: attn.to_v(t).unflatten(1, (attn.heads, -1)) for i, t in texts.items()}
    out = ctx.cross_attention(q, keys, values, segments).flatten(1)
    if images:  # Wan 2.1 I2V: the same queries over the image's tokens, with the added K/V projections
        keys = {i: attn.norm_added_k(attn.add_k_proj(t)).unflatten(1, (attn.heads, -1)) for i, t in images.items()}
        values = {i: attn.add_v_proj(t).unflatten(1, (attn.heads, -1)) for i, t in images.items()}
        out = out + ctx.cross_attention(q, keys, values, segments).flatten(1)
    x = x + attn.to_out[1](attn.to_out[0](out))

    normed = (block.norm3(x.float()) * (1 + modulation(4)) + modulation(3)).type_as(x)
    return (x.float() + block.ffn(normed).float() * modulation(5)).type_as(x)


def unpatchify(model: WanTransformer3DModel, request: PackedRequest, rows: torch.Tensor) -> torch.Tensor:
    """All output rows of one request -> its noise prediction (channels, frames, height, width)."""
    f, h, w = _grid(model, request.latents)
    p_t, p_h, p_w = model.config.patch_size
    out = rows.reshape(f, h, w, p_t, p_h, p_w, -1).permute(6, 0, 3, 1, 4, 2, 5)
    return out.flatten(5, 6).flatten(3, 4).flatten(1, 2)


def output_rows(model: WanTransformer3DModel, requests: list[PackedRequest], ctx: AttentionContext,
                caches: BlockCaches | None = None) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first token, output rows)} of the tokens this process holds, ready for unpatchify."""
    rows, segments = forward_rows(model, requests, ctx, caches)
    return rows_by_request(rows, segments)
