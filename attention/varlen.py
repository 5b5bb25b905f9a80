"""Varlen attention: many sequences packed back to back, no padding.

q is (total_q, heads, head_dim) and k/v are (total_k, heads, head_dim); sequence i
owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1]
of k/v (separate offsets, so the same call serves cross-attention). Every backend
returns the output and the log-sum-exp of the scaled scores, (total_q, heads) in
fp32, which ring attention needs to merge partial results.

Backends sit behind one registry and are imported only when chosen:
- `flash_attn`: flash-attn's varlen kernel (GPU, when installed);
- `torch_varlen`: PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`,
  CUDA, fp16/bf16): one launch over the whole pack, the GPU default without flash-attn;
- `sdpa`: PyTorch's fused flash kernel, one call per sequence (CPU default; on CUDA
  the flash kernel for fp16/bf16, the memory-efficient one for fp32);
- `block_diagonal`: one masked matmul over the whole pack, in fp32 math; a
  reference backend. `python -m benchmarks.varlen_backends` measured it 40-120x
  slower than `sdpa` on every pack tried (64x16 to 1x4096 tokens), hence the default.
No backend materialises a sequence's score matrix except `block_diagonal`.
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
            o, l = _fused_attention(qi, ki, vi, scale)
            out[q0:q1] = o[0].transpose(0, 1)
            lse[q0:q1] = l[0, :, :q1 - q0].transpose(0, 1).float()
        return out, lse


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one (1, heads, seq, dim) sequence from PyTorch's fused kernels, which return the LSE that the
    public SDPA drops. The CUDA memory-efficient kernel pads its LSE's sequence axis (the caller trims it)."""
    if q.device.type == "cpu":
        o, l, *_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    elif q.dtype in (torch.float16, torch.bfloat16):
        o, l, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    else:
        o, l, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                          scale=scale)
    return o, l


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
        out, lse, _ = self._fn(q, k, v, *_kernel_offsets(cu_seqlens_q, cu_seqlens_k, q.device), softmax_scale=scale,
                               return_attn_probs=True)
        return _keyless_to_zero(out, lse.transpose(0, 1).float(), cu_seqlens_q, cu_seqlens_k)


@register_backend("torch_varlen")
class TorchVarlen(VarlenBackend):
    def __init__(self) -> None:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn  # CUDA kernels, fp16/bf16

        self._fn, self._aux = varlen_attn, AuxRequest(lse=True)
        self._lse_heads_first: bool | None = None  # PyTorch 2.11 returns (heads, tokens), 2.13 (tokens, heads)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        if q.shape[0] == 0 or k.shape[0] == 0:
            return _empty_result(q)
        out, lse = self._call(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
        if self._lse_heads_first is None:  # learn the layout once, from a call whose two axes differ
            probe = q.new_zeros(q.shape[1] + 1, *q.shape[1:])
            _, probe_lse = self._call(probe, probe, probe, [0, len(probe)], [0, len(probe)], scale)
            self._lse_heads_first = probe_lse.shape[0] != len(probe)
        return _keyless_to_zero(out, (lse.T if self._lse_heads_first else lse).float(), cu_seqlens_q, cu_seqlens_k)

    def _call(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
        return self._fn(q, k, v, *_kernel_offsets(cu_seqlens_q, cu_seqlens_k, q.device), return_aux=self._aux,
                        scale=scale)


def _kernel_offsets(cu_seqlens_q: Offsets, cu_seqlens_k: Offsets, device: torch.device,
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(cu_q, cu_k, max_q, max_k) as the GPU varlen kernels take them: int32 offsets on the device, longest lengths."""
    def longest(cu: Offsets) -> int:
        return max(b - a for a, b in zip(cu, cu[1:]))

    return (torch.tensor(cu_seqlens_q, dtype=torch.int32, device=device),
            torch.tensor(cu_seqlens_k, dtype=torch.int32, device=device), longest(cu_seqlens_q), longest(cu_seqlens_k))


def _keyless_to_zero(out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: Offsets, cu_seqlens_k: Offsets,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen kernels leave sequences without keys undefined; give them the documented 0 / -inf."""
    for i in range(len(cu_seqlens_k) - 1):
        if cu_seqlens_k[i + 1] == cu_seqlens_k[i]:
            out[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] = 0
            lse[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] = -math.inf
    return out, lse


_instances: dict[str, VarlenBackend] = {}


def get_backend(name: str = "auto", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> VarlenBackend:
    """`auto` for fp16/bf16 on CUDA: flash-attn when it imports, else PyTorch's varlen kernel when this PyTorch has
    it, else the per-sequence SDPA backend; the per-sequence SDPA backend everywhere else (CPU, fp32)."""
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown varlen backend {name!r}; registered: {sorted(_BACKENDS)}")
        return _instance(name)
    half = dtype in (torch.float16, torch.bfloat16)
    for candidate in ("flash_attn", "torch_varlen") if torch.device(device).type == "cuda" and half else ():
        try:
            return _instance(candidate)
        except ImportError:  # not installed, or a PyTorch without the varlen kernel
            continue
    return _instance("sdpa")


def _instance(name: str) -> VarlenBackend:
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
    impl = get_backend(backend, q.device, q.dtype) if isinstance(backend, str) else backend
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
