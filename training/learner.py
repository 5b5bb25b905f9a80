"""One GRPO+ update of the policy on a batch of scored samples, on one worker or data parallel over N (FSDP).

The policy says how its samples become per-token log-probs: exact for the causal coder (`training.policy`),
estimated under coupled masks for a diffusion coder (`training.dllm_policy`, coupled-GRPO); the update around
them is the same. With `algorithm.substitute_zero_advantage` the groups without signal are first replaced by
copies of groups with signal (`coupled_grpo.substitute_zero_advantage`).

Every worker holds the whole batch and draws the same mini-batch split (a generator seeded by the step); worker r
trains on samples r, r + N, ... of each mini-batch. The losses are token-means over the whole mini-batch
(`grpo_plus_loss(batch_tokens=...)`) and FSDP sums the gradients, so the update does not depend on N. pi_old's
log-probs of every mini-batch are computed before the first update, as verl's `old_log_prob`.
"""

from __future__ import annotations

import torch

from training.config import TrainConfig
from training.coupled_grpo import substitute_zero_advantage
from training.fsdp import all_sum, rank_and_world
from training.grpo import group_advantages, grpo_plus_loss
from training.rollout import Sample


def grpo_update(policy, optimizer: torch.optim.Optimizer, samples: list[Sample], rewards: list[float],
                cfg: TrainConfig, seed: int) -> dict:
    """Mini-batch GRPO+ updates over `samples` (all workers pass the same batch and seed); batch-wide metrics.
    `policy`: a `Policy` or a `DllmPolicy` (`prepare` + `token_logprobs`)."""
    rank, world = rank_and_world()
    advantages, groups = group_advantages(torch.tensor(rewards), cfg.rollout.group_size)
    split = torch.Generator().manual_seed(seed)
    substituted = 0
    if cfg.algorithm.substitute_zero_advantage:
        order = substitute_zero_advantage(torch.tensor(rewards), cfg.rollout.group_size, split)
        substituted = sum(i != j for i, j in zip(order, range(len(order)))) // cfg.rollout.group_size
        samples, advantages = [samples[i] for i in order], advantages[order]
    truncated = torch.tensor([s.truncated for s in samples])
    parts = [part for _ in range(cfg.algorithm.epochs)
             for part in torch.randperm(len(samples), generator=split).chunk(cfg.algorithm.mini_batches)]
    if min(len(p) for p in parts) < world:
        raise ValueError(f"a mini-batch of {min(len(p) for p in parts)} samples cannot feed {world} workers: "
                         "lower algorithm.mini_batches or trainer_workers, or sample more per step")
    prepared: list[tuple[torch.Tensor, object, torch.Tensor]] = []
    entropy_sum = response_tokens = 0.0
    with torch.no_grad():
        for number, part in enumerate(parts):
            mine = part[rank::world]
            # Masks (diffusion policies) are fresh for every mini-batch pass and the same for pi_old and pi_theta.
            seq = policy.prepare([samples[i] for i in mine], seed * len(parts) + number, mine.tolist())
            old, entropy = policy.token_logprobs(seq)
            prepared.append((mine, seq, old))
            entropy_sum += float(entropy) * float(seq.response_mask.sum())
            response_tokens += float(seq.response_mask.sum())
    losses, clipped, counted = [], 0.0, 0.0
    for mine, seq, old in prepared:
        kept = (seq.response_mask * (~truncated[mine]).float().unsqueeze(1)).sum()
        [batch_tokens] = all_sum(float(kept))
        logprobs, _ = policy.token_logprobs(seq)
        loss, stats = grpo_plus_loss(logprobs, old, advantages[mine], seq.response_mask, truncated[mine],
                                     cfg.algorithm.eps_low, cfg.algorithm.eps_high, batch_tokens)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.algorithm.max_grad_norm)
        optimizer.step()
        loss_sum, clipped_tokens = all_sum(loss.item(), stats.clip_fraction * stats.tokens)
        losses.append(loss_sum)
        clipped, counted = clipped + clipped_tokens, counted + batch_tokens
    entropy_sum, response_tokens = all_sum(entropy_sum, response_tokens)
    return {"loss": sum(losses) / len(losses), "clip_fraction": clipped / max(counted, 1.0),
            "entropy": entropy_sum / max(response_tokens, 1.0), "groups_with_signal": groups.signal_fraction,
            "truncated": truncated.float().mean().item(), "groups_substituted": substituted}
