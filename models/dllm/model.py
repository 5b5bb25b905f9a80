"""The Dream / DiffuCoder transformer: Qwen2 layers with non-causal attention, one packed varlen forward.

Built from transformers' Qwen2 building blocks (RMSNorm, SwiGLU MLP, rotary embedding),
with the attention written here because it differs from Qwen2's in the two ways that
matter for serving: it is bidirectional (a masked-diffusion model sees the whole
sequence), and it runs over many sequences packed back to back (`cu_seqlens`, no
padding) through `attention.varlen` (flash-attn varlen on GPU, SDPA per sequence on CPU).
For block-wise decoding with a prefix KV cache (Fast-dLLM), a sequence may bring only
its tail: its `PrefixKV` (the keys and values of its first positions, from an earlier
step) is attended to with the tail's own keys, and a forward can capture a new prefix.
Module names follow Dream's checkpoints (`model.layers.N.self_attn.q_proj`, `lm_head`), so
a checkpoint's state dict loads without remote code (`checkpoint.load_dllm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from attention.varlen import offsets, varlen_attention
from models.dllm.config import DllmConfig


@dataclass
class PrefixKV:
    """Keys (after RoPE) and values of a sequence's first `length` positions, one (length, kv_heads, head_dim) pair
    per layer."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


@dataclass
class _KVPlan:
    """Per packed sequence: the cached prefix it attends to (or None) and how many leading positions' keys and
    values to capture into `captured` (0: none)."""

    prefixes: Sequence[PrefixKV | None]
    capture: Sequence[int]
    captured: list[PrefixKV]


class _Attention(nn.Module):
    def __init__(self, config: DllmConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int],
                backend: str, kv: _KVPlan | None) -> torch.Tensor:
        tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(tokens, self.heads, self.head_dim)
        k = self.k_proj(hidden).view(tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(tokens, self.kv_heads, self.head_dim)
        # apply_rotary_pos_emb wants (batch, heads, seq, dim) and cos/sin (batch, seq, dim).
        q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
        cu_keys = cu_seqlens
        if kv is not None:
            k, v, cu_keys = self._with_prefixes(k, v, cu_seqlens, kv)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out, _ = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_keys,
                                  backend=backend)
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))

    def _with_prefixes(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                       kv: _KVPlan) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Each sequence's keys/values preceded by its cached prefix; captures the leading positions asked for."""
        keys, values, lengths = [], [], []
        for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            own_k, own_v = k[start:end], v[start:end]
            if kv.capture[i]:
                kv.captured[i].keys.append(own_k[:kv.capture[i]].clone())
                kv.captured[i].values.append(own_v[:kv.capture[i]].clone())
            prefix = kv.prefixes[i]
            if prefix is not None:
                own_k, own_v = torch.cat([prefix.keys[self.layer], own_k]), torch.cat([prefix.values[self.layer], own_v])
            keys.append(own_k)
            values.append(own_v)
            lengths.append(own_k.shape[0])
        return torch.cat(keys), torch.cat(values), offsets(lengths)


class _Layer(nn.Module):
    def __init__(self, config: DllmConfig, qwen2: Qwen2Config, index: int) -> None:
        super().__init__()
        self.self_attn = _Attention(config, index)
        self.mlp = Qwen2MLP(qwen2)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int],
                backend: str, kv: _KVPlan | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, cu_seqlens, backend, kv)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Backbone(nn.Module):
    def __init__(self, config: DllmConfig) -> None:
        super().__init__()
        qwen2 = config.qwen2()  # the same dimensions, for transformers' building blocks
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Layer(config, qwen2, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(qwen2)


class DiffusionLM(nn.Module):
    """Dream's architecture; `forward_packed` is the serving forward, `forward` a (batch, seq) convenience."""

    def __init__(self, config: DllmConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_packed(self, input_ids: torch.Tensor, lengths: Sequence[int], kv: _KVPlan | None = None) -> torch.Tensor:
        """Final normed hidden states of sequences packed back to back: `input_ids` (total,), `lengths` summing to
        total; each sequence attends to its own tokens only, in both directions. Without `kv` each sequence's
        positions start at 0; with it, a sequence with a cached prefix of p positions holds positions p, p+1, ..."""
        if sum(lengths) != input_ids.shape[0]:
            raise ValueError(f"lengths sum to {sum(lengths)}, input_ids holds {input_ids.shape[0]} tokens")
        starts = [0] * len(lengths) if kv is None else [p.length if p is not None else 0 for p in kv.prefixes]
        if max(s + n for s, n in zip(starts, lengths)) > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {max(s + n for s, n in zip(starts, lengths))} tokens exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        positions = torch.cat([torch.arange(s, s + n, device=input_ids.device) for s, n in zip(starts, lengths)])[None]
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(hidden[None], positions)
        cu_seqlens = offsets(lengths)
        for layer in self.model.layers:
            hidden = layer(hidden, cos[0], sin[0], cu_seqlens, self.attention_backend, kv)
        return self.model.norm(hidden)

    def forward_packed(self, input_ids: torch.Tensor, lengths: Sequence[int],
                       logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the packed sequences, (total, vocab); with `logit_rows` only those rows, (len(rows), vocab):
        the decoder needs logits at the positions before masked tokens only, and the vocabulary projection of
        every other position is most of a step's FLOPs at a 152k vocabulary."""
        hidden = self.hidden_packed(input_ids, lengths)
        return self.lm_head(hidden if logit_rows is None else hidden[logit_rows])

    def forward_cached(self, input_ids: torch.Tensor, lengths: Sequence[int], logit_rows: torch.Tensor,
                       prefixes: Sequence[PrefixKV | None], capture: Sequence[int]) -> tuple[torch.Tensor, list[PrefixKV]]:
        """`forward_packed` where sequence i brings only the tokens after its cached `prefixes[i]` (None: all of
        them) and asks for the keys/values of its first `capture[i]` computed positions as a new prefix (0: none).
        Returns the logits at `logit_rows` and one `PrefixKV` per sequence (empty where nothing was captured)."""
        kv = _KVPlan(prefixes, capture, [PrefixKV() for _ in lengths])
        hidden = self.hidden_packed(input_ids, lengths, kv)
        return self.lm_head(hidden[logit_rows]), kv.captured

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids of equal-length sequences -> (batch, seq, vocab) logits, unshifted."""
        batch, seq = input_ids.shape
        return self.forward_packed(input_ids.reshape(-1), [seq] * batch).view(batch, seq, -1)
