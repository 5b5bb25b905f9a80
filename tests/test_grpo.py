"""GRPO+ advantages and loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from training.grpo import group_advantages, grpo_plus_loss


def test_group_relative_advantages_and_signal_count():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, stats = group_advantages(rewards, group_size=4, eps=0.0)
    # Group 1: mean 0.25, unbiased std 0.5 -> (1 - .25)/.5 = 1.5 and (0 - .25)/.5 = -0.5.
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # Group 2: all equal -> no signal, zero advantage.
    assert adv[4:].tolist() == [0.0] * 4
    assert (stats.groups, stats.groups_with_signal, stats.signal_fraction) == (2, 1, 0.5)


def test_group_of_one_has_zero_advantage_and_no_signal():
    adv, stats = group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    assert adv.tolist() == [0.0, 0.0] and stats.groups_with_signal == 0
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), group_size=3)


def _loss(ratios, advantages, mask=None, truncated=None):
    ratios = torch.tensor(ratios, dtype=torch.float64)
    old = torch.zeros_like(ratios)
    mask = torch.ones_like(ratios) if mask is None else torch.tensor(mask, dtype=torch.float64)
    truncated = torch.zeros(ratios.shape[0], dtype=torch.bool) if truncated is None else torch.tensor(truncated)
    return grpo_plus_loss(torch.log(ratios), old, torch.tensor(advantages, dtype=torch.float64), mask, truncated)


def test_clip_high_branch_bites():
    # A > 0, ratio 1.5 > 1 + 0.28: the clipped term 1.28 * A is the minimum.
    loss, stats = _loss([[1.5, 1.0]], [2.0])
    assert loss.item() == pytest.approx(-(1.28 * 2.0 + 1.0 * 2.0) / 2)
    # Averaging the unclipped term instead (a bug seen in public code) would give this:
    assert loss.item() != pytest.approx(-(1.5 * 2.0 + 1.0 * 2.0) / 2)
    assert stats.clip_fraction == pytest.approx(0.5)
    # Clip-high differs from symmetric clipping: ratio 1.25 is inside [0.8, 1.28] (not clipped at 1.2).
    loss, stats = _loss([[1.25]], [1.0])
    assert loss.item() == pytest.approx(-1.25) and stats.clip_fraction == 0.0


def test_low_side_clip_for_negative_advantages():
    # A < 0, ratio 0.5 < 0.8: min(0.5 * -1, 0.8 * -1) = -0.8 -> loss 0.8.
    loss, stats = _loss([[0.5]], [-1.0])
    assert loss.item() == pytest.approx(0.8) and stats.clip_fraction == 1.0
    # A < 0, ratio 1.5: the unclipped -1.5 is the minimum (no upper clip for negative advantages).
    assert _loss([[1.5]], [-1.0])[0].item() == pytest.approx(1.5)


def test_token_mean_over_the_batch_and_overlong_filtering():
    # Response 1: 3 tokens, A = 1; response 2: 1 token, A = -1; ratios 1.
    loss, stats = _loss([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [1.0, -1.0], mask=[[1, 1, 1], [1, 0, 0]])
    assert loss.item() == pytest.approx(-(3 * 1.0 - 1.0) / 4) and stats.tokens == 4
    # The same batch with response 1 truncated: only response 2's token counts.
    loss, stats = _loss([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [1.0, -1.0], mask=[[1, 1, 1], [1, 0, 0]],
                        truncated=[True, False])
    assert loss.item() == pytest.approx(1.0) and stats.tokens == 1


def test_all_truncated_or_all_equal_gives_zero_loss_and_zero_gradient():
    logp = torch.log(torch.tensor([[1.2, 0.9]], dtype=torch.float64)).requires_grad_()
    loss, _ = grpo_plus_loss(logp, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                             torch.ones(1, 2), torch.tensor([False]))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)
    loss, stats = _loss([[1.3]], [1.0], truncated=[True])
    assert loss.item() == 0.0 and stats.tokens == 0 and not math.isnan(loss.item())
