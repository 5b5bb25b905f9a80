"""coupled-GRPO (DiffuCoder): GRPO+ for a masked-diffusion coder, with per-token log-likelihoods estimated under
coupled masks.

A masked diffusion LM has no left-to-right factorisation, so log pi(o_j | q) of a response token has no exact
value. What the trainer uses instead, for response o of prompt q laid on the canvas it was sampled on (the
response, then EOS up to the `max_tokens` positions the decoder filled), is token j's term of the
masked-diffusion ELBO

    l_j(theta) = E_{t ~ U[t_lo, t_hi]} E_{M ~ Bernoulli(t)^canvas} [ log p_theta(o_j | q, o with M masked) | j in M ]

estimated from forwards of the canvas with a random subset M of its positions replaced by [MASK]:

    single mask (one forward):   s_j(t, M)  = 1[j in M] / t * log p_theta(o_j | q, o_M)          E[s_j] = l_j
    coupled pair (two forwards): c_j(t, M)  = ( s_j(t, M) + s_j(1 - t, M^c) ) / 2

M^c (the complement) is a Bernoulli(1 - t) mask and, the range being symmetric (t_lo + t_hi = 1), 1 - t has
the law of t: both halves are single-mask estimates of l_j, so E[c_j] = l_j exactly. Every canvas token is
masked in exactly one of the two forwards, so each token is scored exactly once per pair instead of 0, 1 or 2
times by two independent masks: the variance is lower at the same number of forwards (measured in
`tests/test_coupled_grpo.py` and `benchmarks/coupled_grpo.py`). With `pairs` > 1 the estimate is the mean of
that many independent pairs; the `single` estimator (the baseline) is the mean of 2 x `pairs` independent
single-mask estimates: the same forwards.

The loss is GRPO+'s (`training.grpo`), unchanged: group-relative advantages, ratio
rho_j = exp(c_j(theta) - c_j(theta_old)) with the same masks for theta and theta_old (drawn once per sample
and mini-batch, seeded, so N data-parallel workers draw what one worker draws), clip 0.2 / 0.28, token-mean
over the response tokens plus the EOS that ended each response, truncated responses masked out, no KL term,
no entropy bonus.

Zero-advantage substitution (Dream-Coder, optional): the groups of a batch whose rewards are all equal carry no
gradient; each is replaced by a copy of a group that has signal, drawn uniformly (seeded) among them, so the
batch keeps its size and every sample in it teaches something. A batch without any such group is unchanged.

Simplifications, against DiffuCoder's code: its estimate also averages in a third forward with every response
token masked (d1's estimator) - left out, the coupled pair alone is what the paper analyses; its mask ratio is
drawn once per batch, here once per sample and pair; the canvas after the response's first EOS is filled with
EOS (the serving engine returns the response up to that EOS; Dream's SFT pads with it too), and those filler
positions are masked like the others but not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from training.grpo import groups_with_signal

Estimator = Literal["coupled", "single"]


@dataclass(frozen=True)
class CanvasBatch:
    """Samples laid out for the estimator: prompt ids, canvas targets, the scored positions, and the masks.

    Per sample i: `prompt_ids[i]` then `canvas[i]` positions (width = the longest canvas, shorter ones padded and
    never scored). `masks[i, k]` is forward k's set of masked canvas positions and `weights[i, k]` that forward's
    1/t (it scores only the positions it masks)."""

    prompt_ids: list[list[int]]
    targets: torch.Tensor        # (n, width) canvas token ids
    canvas: list[int]            # canvas length of each sample
    response_mask: torch.Tensor  # (n, width) 1.0 at the scored positions: response tokens + their EOS
    masks: torch.Tensor          # (n, forwards, width) bool
    weights: torch.Tensor        # (n, forwards) 1 / mask ratio of each forward

    @property
    def forwards(self) -> int:
        return self.masks.shape[1]


def mask_ratio_range(t_low: float) -> tuple[float, float]:
    if not 0.0 < t_low <= 0.5:
        raise ValueError(f"the mask ratio's lower bound must be in (0, 0.5], got {t_low}")
    return t_low, 1.0 - t_low


def draw_masks(width: int, pairs: int, estimator: Estimator, t_low: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's 2 x `pairs` masks over `width` canvas positions and the 1/t of each: complementary pairs
    (`coupled`) or independent draws (`single`)."""
    low, high = mask_ratio_range(t_low)
    if estimator == "coupled":
        ratios = low + (high - low) * torch.rand(pairs, generator=generator, dtype=torch.float64)
        first = torch.rand(pairs, width, generator=generator, dtype=torch.float64) < ratios[:, None]
        masks = torch.stack([first, ~first], dim=1).reshape(2 * pairs, width)
        ratios = torch.stack([ratios, 1.0 - ratios], dim=1).reshape(2 * pairs)
    elif estimator == "single":
        ratios = low + (high - low) * torch.rand(2 * pairs, generator=generator, dtype=torch.float64)
        masks = torch.rand(2 * pairs, width, generator=generator, dtype=torch.float64) < ratios[:, None]
    else:
        raise ValueError(f"estimator must be 'coupled' or 'single', got {estimator!r}")
    return masks, (1.0 / ratios).float()


def sample_seed(seed: int, index: int) -> int:
    """The mask seed of sample `index` of a batch seeded `seed`: the same on every worker, for any worker count."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def canvas_batch(prompts: list[list[int]], responses: list[list[int]], canvas_lengths: list[int], eos_id: int,
                 pairs: int, estimator: Estimator, t_low: float, seeds: list[int]) -> CanvasBatch:
    """Lay out each response on its canvas (response, then EOS to `canvas_lengths[i]`) and draw its masks with its
    own seed. Scored: the response tokens and, when the response ended before the canvas did, its EOS."""
    width = max(canvas_lengths)
    n = len(prompts)
    targets = torch.full((n, width), eos_id, dtype=torch.long)
    scored = torch.zeros((n, width))
    masks = torch.zeros((n, 2 * pairs, width), dtype=torch.bool)
    weights = torch.zeros((n, 2 * pairs))
    for i, (response, length) in enumerate(zip(responses, canvas_lengths)):
        if len(response) > length:
            raise ValueError(f"sample {i}: a response of {len(response)} tokens on a canvas of {length}")
        targets[i, :len(response)] = torch.tensor(response, dtype=torch.long)
        scored[i, :min(len(response) + 1, length)] = 1.0
        generator = torch.Generator().manual_seed(seeds[i])
        sample_masks, sample_weights = draw_masks(length, pairs, estimator, t_low, generator)
        masks[i, :, :length], weights[i] = sample_masks, sample_weights
    return CanvasBatch([list(p) for p in prompts], targets, list(canvas_lengths), scored, masks, weights)


def estimate_logprobs(model, batch: CanvasBatch, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator's per-token log-likelihoods (n, width) (0 at unscored positions) and the mean entropy of the
    predictive distributions at the scored masked positions (logged only).

    All 2 x pairs x n masked canvases go through one packed forward; only the rows that predict a scored masked
    position are projected onto the vocabulary (Dream's shift: row j - 1 predicts position j)."""
    n, forwards, width = batch.masks.shape
    ids, lengths, rows, where = [], [], [], []
    offset = 0
    for i in range(n):
        prompt, length = batch.prompt_ids[i], batch.canvas[i]
        canvas = batch.targets[i, :length]
        for k in range(forwards):
            mask = batch.masks[i, k, :length]
            ids.append(torch.tensor(prompt, dtype=torch.long))
            ids.append(torch.where(mask, torch.full_like(canvas, mask_id), canvas))
            positions = (mask & batch.response_mask[i, :length].bool()).nonzero().squeeze(-1)
            rows.append(offset + len(prompt) + positions - 1)
            where.extend((i, k, int(p)) for p in positions)
            lengths.append(len(prompt) + length)
            offset += len(prompt) + length
    logits = model.forward_packed(torch.cat(ids), lengths, logit_rows=torch.cat(rows)).float()
    logp = torch.log_softmax(logits, dim=-1)
    index = torch.tensor(where, dtype=torch.long).reshape(-1, 3)
    taken = logp.gather(-1, batch.targets[index[:, 0], index[:, 2]][:, None]).squeeze(-1)
    weighted = taken * batch.weights[index[:, 0], index[:, 1]] / forwards
    estimate = torch.zeros((n, width), dtype=weighted.dtype).index_put((index[:, 0], index[:, 2]), weighted,
                                                                       accumulate=True)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1).mean() if len(where) else torch.zeros(())
    return estimate, entropy


def substitute_zero_advantage(rewards: torch.Tensor, group_size: int, generator: torch.Generator) -> list[int]:
    """Sample indices of the batch to train on: every group whose rewards are all equal replaced by a copy of a
    group with signal, drawn uniformly; the identity when no group (or every group) has signal."""
    with_signal = groups_with_signal(rewards, group_size)
    signal = with_signal.nonzero().squeeze(-1).tolist()
    order = []
    for g in range(with_signal.shape[0]):
        source = g
        if signal and not with_signal[g]:
            source = signal[int(torch.randint(len(signal), (1,), generator=generator))]
        order.extend(range(source * group_size, (source + 1) * group_size))
    return order
