"""What every family's packed forward shares: the per-request input and the dual-stream joint layout.

A packed forward takes a list of `PackedRequest` (one per forward row: with
classifier-free guidance a request gives two, its cond and uncond text over the
same latents) and returns one prediction per entry, computed in one pass.

Single-stream families (CogVideoX, Wan) keep all tokens of a request in one row
tensor. Dual-stream (MMDiT) families (Mochi, SD3, HunyuanVideo 1.5) keep video and text tokens in
two tensors with different widths and weights, joined only inside attention: a
`JointLayout` maps this process's rows of the joint sequence [video; text] of every
request to positions in `cat([video_rows, text_rows])`, so the joint q/k/v is one
`index_select` and the split back is another.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from attention.context import AttentionContext, LocalAttention, Segment
from models.block_caches import BlockCaches


@dataclass(frozen=True)
class PackedRequest:
    """One forward row's transformer input, without a batch dimension (diffusers' per-sample layout)."""

    latents: torch.Tensor
    timestep: torch.Tensor  # 0-d
    text: torch.Tensor  # (text_tokens, text_dim): only the tokens the model attends to
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # CogVideoX 5b-style RoPE (cos, sin) of video tokens
    pooled: torch.Tensor | None = None  # SD3's pooled text projection (pooled_dim,)
    image: torch.Tensor | None = None  # image tokens: Wan 2.1 I2V's CLIP, HunyuanVideo 1.5 I2V's SigLIP
    glyph: torch.Tensor | None = None  # HunyuanVideo 1.5's ByT5 tokens of the prompt's quoted text (tokens, byt5_dim)
    clean_tokens: int = 0  # leading video tokens at timestep 0: the image first frame (LTX, TI2V-5B image input)


@dataclass(frozen=True)
class JointLayout:
    """Where this process's joint rows come from: video rows first, then text rows (two streams).

    `segments` are over joint token positions of each request ([video; text]);
    `video` / `text` list (request, token slice) pieces in the order of the stream tensors.
    """

    segments: list[Segment]
    video: list[tuple[int, slice]]
    text: list[tuple[int, slice]]
    index: torch.Tensor  # joint row j comes from cat([video_rows, text_rows])[index[j]]
    inverse: torch.Tensor  # cat([video_rows, text_rows])[i] is joint row inverse[i]

    @property
    def video_rows(self) -> int:
        return sum(s.stop - s.start for _, s in self.video)

    def join(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.cat([video, text]).index_select(0, self.index)

    def split(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = joint.index_select(0, self.inverse)
        return both[:self.video_rows], both[self.video_rows:]


def joint_layout(segments: list[Segment], video_tokens: list[int], device: torch.device) -> JointLayout:
    """Split each joint segment at its request's video/text boundary and index the two streams."""
    video, text, sources = [], [], []  # sources: per joint row piece, (stream, position in stream, length)
    v_at = t_at = 0
    for s in segments:
        n_video = video_tokens[s.request]
        v_start, v_stop = min(s.token_start, n_video), min(s.token_start + s.length, n_video)
        if v_stop > v_start:
            video.append((s.request, slice(v_start, v_stop)))
            sources.append(("video", v_at, v_stop - v_start))
            v_at += v_stop - v_start
        t_start, t_stop = max(s.token_start, n_video) - n_video, s.token_start + s.length - n_video
        if t_stop > t_start:
            text.append((s.request, slice(t_start, t_stop)))
            sources.append(("text", t_at, t_stop - t_start))
            t_at += t_stop - t_start
    index = torch.cat([torch.arange(at, at + n) + (0 if stream == "video" else v_at)
                       for stream, at, n in sources]) if sources else torch.zeros(0, dtype=torch.long)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index))
    return JointLayout(segments, video, text, index.to(device), inverse.to(device))


def held_joint_layout(ctx: AttentionContext, counts: list[int], video_tokens: list[int], device: torch.device
                      ) -> tuple[JointLayout, list[int]]:
    """A dual-stream forward's prologue: the joint layout of the tokens this process holds and the requests they
    belong to, in order (a Brick shard holds a slice of some requests and none of others)."""
    layout = joint_layout(ctx.segments(counts), video_tokens, device)
    return layout, sorted({s.request for s in layout.segments})


def modulated_output(model: torch.nn.Module, x: torch.Tensor, temb: dict[int, torch.Tensor],
                     layout: JointLayout) -> torch.Tensor:
    """A dual-stream forward's epilogue: the final AdaLN (`norm_out`, scale and shift from each request's time
    embedding, over its video rows) and `proj_out`."""
    norm_out = model.norm_out
    scale, shift = expand_pieces({i: norm_out.linear(norm_out.silu(t).to(x.dtype)) for i, t in temb.items()},
                                 layout.video).chunk(2, dim=1)
    return model.proj_out(norm_out.norm(x) * (1 + scale) + shift)


def gather_pieces(per_request: dict[int, torch.Tensor], pieces: list[tuple[int, slice]]) -> torch.Tensor:
    """Rows of per-request token tensors for the pieces of one stream (a rank may hold none of a stream)."""
    if not pieces:
        return next(iter(per_request.values()))[:0]
    return torch.cat([per_request[r][tokens] for r, tokens in pieces])


def expand_pieces(per_request: dict[int, torch.Tensor], pieces: list[tuple[int, slice]]) -> torch.Tensor:
    """Repeat a per-request vector over that request's rows of one stream."""
    if not pieces:
        return next(iter(per_request.values())).unsqueeze(0)[:0]
    return torch.cat([per_request[r].unsqueeze(0).expand(tokens.stop - tokens.start, -1) for r, tokens in pieces])


def video_rows_by_request(rows: torch.Tensor, layout: JointLayout) -> dict[int, tuple[int, torch.Tensor]]:
    """{request: (first video token, rows)} of this process's video-stream output (one contiguous shard each)."""
    out, at = {}, 0
    for request, tokens in layout.video:
        out[request] = (tokens.start, rows[at:at + tokens.stop - tokens.start])
        at += tokens.stop - tokens.start
    return out


def forward_packed(family: ModuleType, model: torch.nn.Module, requests: list[PackedRequest],
                   ctx: AttentionContext | None = None, caches: BlockCaches | None = None) -> list[torch.Tensor]:
    """Every request's prediction from one packed pass of a family's module (`models/<family>_packed.py`).

    The module gives this process's output rows (`output_rows`) and turns a request's rows
    into its prediction (`unpatchify`); with a `ShardedAttention` context the rows of every
    rank are all-gathered first, so each rank returns every request whole. A rank that holds
    no tokens of this batch only takes part in the gather (and in `caches`' decision).
    `caches` (block-level step caches, `models.block_caches`) is filled with whole tensors:
    what the module kept is all-gathered like the outputs, so every rank holds the same state.
    """
    ctx = ctx or LocalAttention()
    held = ctx.segments(family.token_counts(model, requests))
    if held:  # only the families that run block-level caches (`DiffusionAdapter.cache_modes`) take `caches`
        pieces = family.output_rows(model, requests, ctx) if caches is None else \
            family.output_rows(model, requests, ctx, caches)
    else:
        pieces = {}
        if caches is not None and caches.first_block:
            caches.decide({}, ctx, model.proj_out.weight.device)
    like = model.proj_out.weight.new_empty((0, model.proj_out.out_features))
    full = ctx.gather_outputs(pieces, len(requests), like)
    if caches is not None:
        _gather_block_caches(caches, model.proj_out.weight.new_empty((0, model.proj_out.in_features)), ctx)
    return [family.unpatchify(model, r, full[i]) for i, r in enumerate(requests)]


def _gather_block_caches(caches: BlockCaches, like: torch.Tensor, ctx: AttentionContext) -> None:
    """Every rank's kept residuals, whole (the rows to keep are the same on every rank: decided alike)."""
    if caches.keep:
        kept = ctx.gather_outputs({j: caches.blocks_residual[row] for j, row in enumerate(caches.keep)
                                   if row in caches.blocks_residual}, len(caches.keep), like)
        caches.blocks_residual = dict(zip(caches.keep, kept))
    computed = caches.computed_probed_rows
    if computed:
        both = {j: (caches.head_residual[row][0], torch.cat([caches.head_residual[row][1],
                                                             caches.tail_residual[row][1]], dim=1))
                for j, row in enumerate(computed) if row in caches.head_residual}
        kept = ctx.gather_outputs(both, len(computed), like.new_empty((0, 2 * like.shape[1])))
        caches.head_residual = {row: whole.chunk(2, dim=1)[0] for row, whole in zip(computed, kept)}
        caches.tail_residual = {row: whole.chunk(2, dim=1)[1] for row, whole in zip(computed, kept)}
