"""Varlen attention: many sequences packed back to back, no padding.

q is (total_q, heads, head_dim) and k/v are (total_k, heads, head_dim); sequence i
owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1]
of k/v (separate offsets, so the same call serves cross-attention). Every backend
returns the output and the log-sum-exp of the scaled scores, (total_q, heads) in
fp32, which ring attention needs to merge partial results.

Backends sit behind one registry and are imported only when chosen:
- `flash_attn`: flash-attn's varlen kernel (GPU, when installed);
- `sdpa`: PyTorch's fused CPU flash kernel, one call per sequence (CPU default);
- `block_diagonal`: one masked matmul over the whole pack, in fp32 math; a
  reference backend. `python -m benchmarks.varlen_backends` measured it 40-120x
  slower than `sdpa` on every pack tried (64x16 to 1x4096 tokens), hence the default.
A sequence with no keys gets output 0 and LSE -inf (it then merges as a no-op).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

Offsets = Sequence[int]
_BACKENDS: dict[str, type[VarlenBackend]] = {}


def register_backend(name: str) -> Callable[[type[VarlenBackend]], type[VarlenBackend]]:
    def wrap(cls: type[VarlenBackend]) -> type[VarlenBackend]:
        _BACKENDS[name] = cls
        cls.name = name
        return cls

    return wrap


class VarlenBackend(ABC):
    name: str

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Offsets,
                cu_seqlens_k: Offsets, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (out like q, lse (total_q, heads) fp32)."""


def offsets(lengths: Sequence[int]) -> list[int]:
    """cu_seqlens of sequences packed back to back: [0, n0, n0+n1, ...]."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)


@register_backend("sdpa")
class SdpaSegments(VarlenBackend):
    """PyTorch's fused flash kernel per sequence; it returns the LSE (the public SDPA does not)."""

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        out, lse = _empty_result(q)
        for i in range(len(cu_seqlens_q) - 1):
            q0, q1, k0, k1 = cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]
            if q1 == q0 or k1 == k0:
                continue
            # (1, heads, seq, dim) views, as the kernel expects.
            qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
            if q.device.type == "cpu":
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qi, ki, vi, 0.0, False, scale=scale)
            else:
                o, l = _math_attention(qi, ki, vi, scale)
            out[q0:q1] = o[0].transpose(0, 1)
            lse[q0:q1] = l[0].transpose(0, 1).float()
        return out, lse


def _math_attention(q, k, v, scale, mask=None):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min)).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype), lse


@register_backend("block_diagonal")
class BlockDiagonal(VarlenBackend):
    """One matmul over the whole pack with a block-diagonal mask (O(total_q * total_k) memory)."""

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_result(q)
        seg_q = _segment_ids(cu_seqlens_q, q.device)
        seg_k = _segment_ids(cu_seqlens_k, q.device)
        mask = seg_q.unsqueeze(1) == seg_k.unsqueeze(0)
        out, lse = _math_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale, mask)
        return out.transpose(0, 1), lse.transpose(0, 1)


def _segment_ids(cu: Offsets, device) -> torch.Tensor:
    lengths = torch.tensor([cu[i + 1] - cu[i] for i in range(len(cu) - 1)], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


@register_backend("flash_attn")
class FlashAttnVarlen(VarlenBackend):
    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func  # GPU extra

        self._fn = flash_attn_varlen_func

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_result(q)
        cu_q = torch.tensor(cu_seqlens_q, dtype=torch.int32, device=q.device)
        cu_k = torch.tensor(cu_seqlens_k, dtype=torch.int32, device=q.device)
        max_q = max(b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:]))
        max_k = max(b - a for a, b in zip(cu_seqlens_k, cu_seqlens_k[1:]))
        out, lse, _ = self._fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, return_attn_probs=True)
        # flash-attn leaves sequences without keys undefined; give them the documented 0 / -inf.
        lse = lse.transpose(0, 1).float()
        empty_k = [i for i in range(len(cu_seqlens_k) - 1) if cu_seqlens_k[i + 1] == cu_seqlens_k[i]]
        for i in empty_k:
            out[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] = 0
            lse[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] = -math.inf
        return out, lse


_instances: dict[str, VarlenBackend] = {}


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> VarlenBackend:
    """`auto` picks flash-attn on CUDA when it imports, else the per-sequence SDPA backend."""
    if name == "auto":
        name = "sdpa"
        if torch.device(device).type == "cuda":
            try:
                import flash_attn  # noqa: F401

                name = "flash_attn"
            except ImportError:
                pass
    if name not in _BACKENDS:
        raise ValueError(f"unknown varlen backend {name!r}; registered: {sorted(_BACKENDS)}")
    if name not in _instances:
        _instances[name] = _BACKENDS[name]()
    return _instances[name]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Offsets,
                     cu_seqlens_k: Offsets, scale: float | None = None,
                     backend: str | VarlenBackend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each packed q sequence over its own k/v sequence; returns (out, lse)."""
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_seqlens_q)} offsets, cu_seqlens_k {len(cu_seqlens_k)}")
    if cu_seqlens_q[-1] != q.shape[0] or cu_seqlens_k[-1] != k.shape[0]:
        raise ValueError(f"offsets end at {cu_seqlens_q[-1]}/{cu_seqlens_k[-1]}, tensors hold {q.shape[0]}/{k.shape[0]}")
    impl = get_backend(backend, q.device) if isinstance(backend, str) else backend
    return impl.forward(q, k, v, list(cu_seqlens_q), list(cu_seqlens_k), scale or q.shape[-1] ** -0.5)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                   block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets, in fp32.

    out/lse are the running fp32 accumulators; returns the merged pair. A side with
    LSE -inf (no keys yet) contributes nothing.
    """
    new_lse = torch.logaddexp(lse, block_lse.float())
    finite = torch.isfinite(new_lse)
    safe = torch.where(finite, new_lse, torch.zeros_like(new_lse))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_new = torch.where(finite, torch.exp(block_lse.float() - safe), torch.zeros_like(lse)).unsqueeze(-1)
    return out * w_old + block_out.float() * w_new, new_lse
