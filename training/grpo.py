"""GRPO+ (DeepCoder's variant of GRPO): advantages and the policy loss, as small pure functions.

For a problem q the rollout samples a group of G responses o_1..o_G with sparse
rewards r_i in {0, 1}. The objective minimised per training batch is

    A_i        = (r_i - mean_j r_j) / (std_j r_j + eps)        (group-relative advantage;
                 std is the unbiased sample std; a group of size 1 has A = 0)
    rho_{i,t}  = exp(log pi_theta(o_{i,t} | q, o_{i,<t}) - log pi_old(o_{i,t} | q, o_{i,<t}))
    L(theta)   = - sum_{i,t} m_{i,t} * min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
                   / sum_{i,t} m_{i,t}

with eps_low = 0.2, eps_high = 0.28 ("clip-high" lets low-probability tokens grow),
token-mean aggregation over the whole batch (long responses weigh by their tokens),
and m_{i,t} = 1 for the response tokens of responses that finished within the length
limit, 0 for prompt tokens, padding, and every token of a truncated response
("overlong filtering": a cut-off answer is neither rewarded nor punished).
Deliberate omissions (as in DeepCoder): no KL term and no reference model; no
entropy bonus (entropy is measured and logged only). Groups whose rewards are all
equal have A = 0 for every response: they carry no signal and are counted.
pi_old is the policy that the trainer holds at the start of the step (verl's
`old_log_prob`), recomputed by the trainer; the samples themselves may come from
weights one step older (one-off pipelining), which the trainer logs as staleness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupStats:
    groups: int
    groups_with_signal: int

    @property
    def signal_fraction(self) -> float:
        return self.groups_with_signal / self.groups if self.groups else 0.0


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (rewards laid out group after group): whether its rewards differ, i.e. whether it carries signal."""
    grouped = rewards.view(-1, group_size)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> tuple[torch.Tensor, GroupStats]:
    """Rewards laid out group after group (len = groups * group_size) -> per-response advantages."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    advantages = torch.where(std > 0, (grouped - mean) / (std + eps), torch.zeros_like(grouped))
    with_signal = int(groups_with_signal(rewards, group_size).sum())
    return advantages.view(-1), GroupStats(grouped.shape[0], with_signal)


@dataclass(frozen=True)
class LossStats:
    clip_fraction: float  # share of counted tokens where the clipped term was the minimum
    tokens: int


def grpo_plus_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   response_mask: torch.Tensor, truncated: torch.Tensor, eps_low: float = 0.2,
                   eps_high: float = 0.28, batch_tokens: float | None = None) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate with clip-high, token-mean over the batch, truncated responses masked out.

    logprobs/old_logprobs/response_mask: (responses, tokens); advantages/truncated: (responses,).
    `batch_tokens`: the counted tokens of the whole batch when these responses are one worker's part of it (data
    parallel: the parts' losses then sum to the batch's); default: these responses' own count.
    """
    mask = response_mask.float() * (~truncated.bool()).float().unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    tokens = mask.sum()
    denominator = tokens.clamp_min(1.0) if batch_tokens is None else max(batch_tokens, 1.0)
    loss = (per_token * mask).sum() / denominator
    clip_fraction = float(((clipped < unclipped).float() * mask).sum() / tokens.clamp_min(1.0))
    return loss, LossStats(clip_fraction, int(tokens))
