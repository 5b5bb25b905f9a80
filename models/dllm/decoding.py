"""Masked-diffusion decoding as in Dream's generation utilities, one request's state at a time.

A request is its prompt followed by `max_tokens` [MASK] tokens. Denoising step i of N
(times t = 1 -> eps on `linspace(1, eps, N + 1)`, s the next time) reads the logits at
the masked positions (shifted: the logits of position j - 1 predict token j) and
unmasks a share 1 - s/t of the masks still left (all of them at the last step):

- `origin`: each mask independently with probability 1 - s/t, its token sampled;
- `maskgit_plus`: the planned number of masks with the highest probability of their token;
- `topk_margin`: ... with the largest top-1 minus top-2 probability;
- `entropy` (default): ... with the lowest entropy of their distribution.

With `alg_temp` > 0 the positions are sampled from softmax(confidence / alg_temp) instead
of taken top-k. Tokens are sampled with `temperature` / `top_p` / `top_k` (greedy at 0).
`eos_penalty` is Dream-Coder's padding penalty: subtracted from the PAD/EOS logits,
decaying linearly over the steps (the whole penalty at step 0, 1/N of it at the last), so
early steps do not fill the response tail with padding while the last can still end it.
`confidence_threshold` (Fast-dLLM's parallel decoding) also unmasks, at every step,
each masked position whose token has at least that probability, and at least one
position per step, so confident stretches are decoded in fewer steps; the sequence is
final as soon as no mask is left.
`block_length` (Fast-dLLM / LLaDA block-wise, semi-autoregressive decoding) splits the
response into blocks decoded left to right: each block gets steps / blocks steps of the
same schedule over its own masks, the masks after it wait (a block fully unmasked early,
e.g. by the threshold, hands its remaining steps to the next). With `prefix_cache` the
keys and values of the positions before the current block are computed once per block
(at its first step) and reused by its other steps, which then compute only the block and
what follows it: Fast-dLLM's approximation (the cached prefix does not see the later
blocks change), measured against the exact decoder in benchmarks/dllm_decoding.py.
The [MASK] token itself is never sampled (Dream leaves that to the trained weights; here a
decided position can never fall back to a mask, whatever the weights). The response is
the text before the first EOS/PAD.

`DllmSequence` holds one request's tokens and its own seeded generator on the worker's
device, so a request decodes to the same tokens alone or packed with others, whatever
its neighbours draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only the type: the model module loads transformers
    from models.dllm.model import PrefixKV

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclass(frozen=True)
class DecodeParams:
    """Decoding knobs of one request; ranges are checked here so a bad request fails before it is admitted."""

    max_tokens: int
    steps: int
    alg: str = "entropy"
    alg_temp: float = 0.0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    eos_penalty: float = 0.0
    confidence_threshold: float | None = None
    block_length: int | None = None
    prefix_cache: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.steps <= self.max_tokens:
            raise ValueError(f"steps must be in 1..max_tokens ({self.max_tokens}), got {self.steps}")
        if self.alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {list(ALGORITHMS)}, got {self.alg!r}")
        if self.alg_temp < 0 or self.temperature < 0 or self.eos_penalty < 0:
            raise ValueError("alg_temp, temperature and eos_penalty must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.confidence_threshold is not None:
            if not 0 < self.confidence_threshold <= 1:
                raise ValueError(f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}")
            if self.alg == "origin" or self.alg_temp:
                raise ValueError("confidence_threshold needs a confidence-ranked alg (maskgit_plus, topk_margin, "
                                 "entropy) with alg_temp 0")
        if self.block_length is not None:
            if not 1 <= self.block_length <= self.max_tokens or self.max_tokens % self.block_length:
                raise ValueError(f"block_length must divide max_tokens ({self.max_tokens}), got {self.block_length}")
            if self.steps % self.blocks:
                raise ValueError(f"steps must be a multiple of the {self.blocks} blocks (max_tokens / block_length), "
                                 f"got {self.steps}")
        elif self.prefix_cache:
            raise ValueError("prefix_cache needs block_length (the prefix is what precedes the current block)")

    @property
    def blocks(self) -> int:
        return self.max_tokens // (self.block_length or self.max_tokens)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Temperature, then nucleus (keeping the first token over the threshold), then top-k, as Dream orders them."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    return logits


def sample_tokens(logits: torch.Tensor, params: DecodeParams,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, confidence under `params.alg`'s measure, probability of each token) for each row of `logits`."""
    probs = torch.softmax(filter_logits(logits.float(), params.temperature, params.top_p, params.top_k), dim=-1)
    if params.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    if params.alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif params.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)  # negative entropy: higher is surer
    probability = probs.gather(-1, tokens[:, None]).squeeze(-1)
    if params.alg not in ("topk_margin", "entropy"):
        confidence = probability
    return tokens, confidence, probability


class DllmSequence:
    """One request being decoded: prompt + response tokens on the worker's device, its step and its generator."""

    def __init__(self, prompt_ids: list[int], params: DecodeParams, mask_id: int, eos_ids: tuple[int, ...],
                 device: str | torch.device = "cpu") -> None:
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token (position 0's logits predict nothing)")
        self.params, self.mask_id, self.eos_ids = params, mask_id, tuple(eos_ids)
        self.prompt_len = len(prompt_ids)
        self.tokens = torch.tensor(list(prompt_ids) + [mask_id] * params.max_tokens, device=device)
        self.step_index = 0
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.block_length = params.block_length or params.max_tokens
        self.steps_per_block = params.steps // params.blocks
        self.timesteps = torch.linspace(1, params.eps, self.steps_per_block + 1, device=device)
        self.block = 0  # the block being decoded: the one holding the response's first mask
        self.block_step = 0  # steps spent on it
        self.prefix_kv: PrefixKV | None = None  # with prefix_cache: positions before `forward_start`, for `block`

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    @property
    def done(self) -> bool:
        return self.step_index >= self.params.steps

    def masked_positions(self) -> torch.Tensor:
        """The masks this step may unmask: those of the current block (all of the response's without blocks)."""
        start = self.prompt_len + self.block * self.block_length
        block = self.tokens[start:start + self.block_length]
        return (block == self.mask_id).nonzero().squeeze(-1) + start

    @property
    def forward_start(self) -> int:
        """First position this step's forward computes: 0, or with the prefix cache, past the block's first step,
        the position that predicts the block's first token (the cache holds everything before it)."""
        if self.prefix_kv is None:
            return 0
        return self.prefix_kv.length

    @property
    def prefix_to_capture(self) -> int:
        """Positions whose keys/values this step's forward should keep as the prefix cache (0: none)."""
        if not self.params.prefix_cache or self.prefix_kv is not None:
            return 0
        return self.prompt_len + self.block * self.block_length - 1

    def forward_tokens(self) -> torch.Tensor:
        return self.tokens[self.forward_start:]

    def logit_rows(self) -> torch.Tensor:
        """Rows of this step's forward (from `forward_start`) whose logits it needs: before each mask (the shift)."""
        return self.masked_positions() - 1 - self.forward_start

    def step(self, mask_logits: torch.Tensor) -> None:
        """Apply denoising step `step_index` given the logits predicting each masked position, in position order."""
        if self.done:
            raise RuntimeError("the sequence has finished its steps")
        params, i, j = self.params, self.step_index, self.block_step
        masked = self.masked_positions()
        if mask_logits.shape[0] != masked.shape[0]:
            raise ValueError(f"{mask_logits.shape[0]} logit rows for {masked.shape[0]} masked positions")
        last = i == params.steps - 1 or j == self.steps_per_block - 1  # the block's last step unmasks all it has left
        # 0-d float32 tensors, as Dream computes them: the planned count int(n * share) must round as it does.
        share = torch.ones((), device=masked.device) if last else 1 - self.timesteps[j + 1] / self.timesteps[j]
        mask_logits = mask_logits.clone()
        mask_logits[:, self.mask_id] = float("-inf")  # a position once decided never goes back to [MASK]
        mask_logits[:, list(self.eos_ids)] -= params.eos_penalty * (1 - i / params.steps)
        if masked.numel():
            if params.alg == "origin":
                chosen = (torch.rand(masked.shape[0], generator=self.generator, device=masked.device) < share
                          ).nonzero().squeeze(-1)
                tokens = sample_tokens(mask_logits[chosen], params, self.generator)[0]
            else:
                tokens, confidence, probability = sample_tokens(mask_logits, params, self.generator)
                count = masked.shape[0] if last else int(masked.shape[0] * share)  # tensor product, then floor
                if params.confidence_threshold is not None:
                    count = max(count, 1)  # Fast-dLLM: at least one position per step, however unsure
                chosen = self._pick(confidence, count)
                if params.confidence_threshold is not None:  # Fast-dLLM: and every token this sure
                    sure = (probability >= params.confidence_threshold).nonzero().squeeze(-1)
                    chosen = torch.unique(torch.cat([chosen, sure]))
                tokens = tokens[chosen]
            self.tokens[masked[chosen]] = tokens
        self.step_index += 1
        self._advance_block()

    def _advance_block(self) -> None:
        """Move on to the block holding the first mask left; a new block drops the prefix cache of the old one."""
        self.block_step += 1
        masks = (self.tokens[self.prompt_len:] == self.mask_id).nonzero()
        block = int(masks[0]) // self.block_length if masks.numel() else self.block
        if block != self.block:
            self.block, self.block_step, self.prefix_kv = block, 0, None

    def _pick(self, confidence: torch.Tensor, count: int) -> torch.Tensor:
        if count == 0:
            return confidence.new_zeros(0, dtype=torch.long)
        if not self.params.alg_temp:
            return torch.topk(confidence, count).indices
        weights = F.softmax(confidence / self.params.alg_temp, dim=-1)
        return torch.multinomial(weights, count, generator=self.generator)

    def response_ids(self) -> list[int]:
        """The response tokens decoded so far, up to the first mask and without the first EOS/PAD and all after it:
        the final answer once `done`, the streamable prefix before."""
        out = []
        for token in self.tokens[self.prompt_len:].tolist():
            if token == self.mask_id or token in self.eos_ids:
                break
            out.append(token)
        return out

    @property
    def final(self) -> bool:
        """The answer can no longer change: every step has run, no mask is left, or an EOS/PAD follows the fully
        unmasked prefix (the masks after it cannot change the text before it)."""
        if self.done:
            return True
        rest = self.tokens[self.prompt_len + len(self.response_ids()):]
        return not rest.numel() or int(rest[0]) in self.eos_ids
