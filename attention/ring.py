"""Ring attention for many rings at once (Brick Attention's SPMD call).

Each request of a `BrickPlan` has its own ring. At ring step s the rank at position
p of a ring holds the KV block that position (p - s) mod R started with: it computes
its queries against that block, merges the partial result with the online-softmax
(LSE) update in fp32, and passes the block to position p + 1 while receiving the
next one from p - 1. All rings advance in lock step inside one call:

- per step, everything a rank sends to one peer (the blocks of every ring in which
  that peer follows it) travels as one buffer; sizes are known to both sides from
  the plan, so no size exchange is needed, and a ring's blocks only ever travel
  between its own neighbours;
- the step's sends/receives are posted with `batch_isend_irecv` before the local
  block is computed, so the transfer overlaps the compute (double buffering: the
  current blocks are being read while the next ones arrive in new buffers);
- all of the rank's shards that still have a block to process at this step are
  computed in one varlen call.

Works with any torch.distributed backend that has point-to-point ops (NCCL, gloo).
Non-causal (DiT) attention; queries and keys are the same tokens (self-attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from attention.plan import BrickPlan, LocalShard, single_ring_plan
from attention.varlen import VarlenBackend, merge_partials, offsets, varlen_attention


@dataclass
class CommStats:
    """Bytes this rank sent and the number of ring steps it took (for benchmarks)."""

    bytes_sent: int = 0
    steps: int = 0
    messages: int = 0
    per_step_seconds: list[float] = field(default_factory=list)


def _block_len(shard: LocalShard, step: int) -> int:
    a = shard.assignment
    return a.shard_len((shard.position - step) % a.size)


def brick_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BrickPlan, rank: int,
                    group: dist.ProcessGroup | None = None, scale: float | None = None,
                    backend: str | VarlenBackend = "auto", stats: CommStats | None = None) -> torch.Tensor:
    """Attention of this rank's packed shards (rows as `plan.local_shards(rank)`) over their full requests.

    q, k, v: (local_tokens, heads, head_dim). Returns the output rows in the same order.
    """
    shards = plan.local_shards(rank)
    if q.shape[0] != sum(s.length for s in shards):
        raise ValueError(f"rank {rank} holds {q.shape[0]} rows, the plan gives it {plan.local_tokens(rank)}")
    scale = scale or q.shape[-1] ** -0.5
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    blocks = [(k[s.start:s.start + s.length], v[s.start:s.start + s.length]) for s in shards]
    steps = max((s.assignment.size for s in shards), default=0)
    for step in range(steps):
        pending, incoming = _post_exchange(shards, blocks, step, rank, group, q, stats)
        active = [i for i, s in enumerate(shards) if step < s.assignment.size]
        if active:
            qs = torch.cat([q[shards[i].start:shards[i].start + shards[i].length] for i in active])
            ks = torch.cat([blocks[i][0] for i in active])
            vs = torch.cat([blocks[i][1] for i in active])
            cu_q, cu_k = offsets([shards[i].length for i in active]), offsets([len(blocks[i][0]) for i in active])
            out, block_lse = varlen_attention(qs, ks, vs, cu_q, cu_k, scale, backend)
            rows = torch.cat([torch.arange(shards[i].start, shards[i].start + shards[i].length, device=q.device)
                              for i in active])
            acc[rows], lse[rows] = merge_partials(acc[rows], lse[rows], out, block_lse)
        for req in pending:
            req.wait()
        blocks = _unpack(shards, blocks, incoming, step, q)
        if stats is not None:
            stats.steps += 1
    return acc.to(q.dtype)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_counts: list[int], rank: int,
                   world_size: int, group: dist.ProcessGroup | None = None, **kwargs) -> torch.Tensor:
    """Classic ring attention: every sequence sharded evenly over all ranks in rank order."""
    return brick_attention(q, k, v, single_ring_plan(token_counts, world_size), rank, group, **kwargs)


def _post_exchange(shards, blocks, step, rank, group, like, stats):
    """Post this step's sends (current blocks to the next rank of each ring) and receives."""
    sends: dict[int, list[torch.Tensor]] = {}
    recv_sizes: dict[int, int] = {}
    for shard, (kb, vb) in zip(shards, blocks):
        a = shard.assignment
        if step + 1 >= a.size:
            continue  # this ring has seen every block
        nxt, prev = a.ranks[(shard.position + 1) % a.size], a.ranks[(shard.position - 1) % a.size]
        sends.setdefault(nxt, []).extend([kb.reshape(-1), vb.reshape(-1)])
        width = like.shape[1] * like.shape[2]
        recv_sizes[prev] = recv_sizes.get(prev, 0) + 2 * _block_len(shard, step + 1) * width
    ops, incoming = [], {}
    for peer in sorted(sends):
        buf = torch.cat(sends[peer]).contiguous()
        ops.append(dist.P2POp(dist.isend, buf, _global(peer, group), group))
        if stats is not None:
            stats.bytes_sent += buf.numel() * buf.element_size()
            stats.messages += 1
    for peer in sorted(recv_sizes):
        incoming[peer] = torch.empty(recv_sizes[peer], dtype=like.dtype, device=like.device)
        ops.append(dist.P2POp(dist.irecv, incoming[peer], _global(peer, group), group))
    return (dist.batch_isend_irecv(ops) if ops else []), incoming


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _unpack(shards, blocks, incoming, step, like):
    """Cut each peer's buffer into the next blocks, in the order the sender packed them."""
    heads, dim = like.shape[1], like.shape[2]
    cursor = {peer: 0 for peer in incoming}
    nxt_blocks = []
    for shard, block in zip(shards, blocks):
        a = shard.assignment
        if step + 1 >= a.size:
            nxt_blocks.append(block)
            continue
        prev = a.ranks[(shard.position - 1) % a.size]
        n = _block_len(shard, step + 1) * heads * dim
        buf, at = incoming[prev], cursor[prev]
        kb = buf[at:at + n].view(-1, heads, dim)
        vb = buf[at + n:at + 2 * n].view(-1, heads, dim)
        cursor[prev] = at + 2 * n
        nxt_blocks.append((kb, vb))
    return nxt_blocks
