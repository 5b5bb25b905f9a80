"""coupled-GRPO's estimator, loss and substitution against exact and hand-computed numbers (tiny dLLM, CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.dllm.checkpoint import load_dllm
from models.dllm.tiny import build_tiny_dllm, write_tiny_dllm
from training.config import TrainConfig
from training.coupled_grpo import CanvasBatch, canvas_batch, draw_masks, estimate_logprobs, substitute_zero_advantage
from training.dllm_policy import DllmPolicy
from training.grpo import grpo_plus_loss
from training.learner import grpo_update
from training.rollout import Sample
from training.toy_tasks import train_problems

LOW, HIGH = 0.2, 0.8


def test_a_coupled_pair_masks_every_position_exactly_once():
    generator = torch.Generator().manual_seed(0)
    masks, weights = draw_masks(50, 3, "coupled", LOW, generator)
    assert masks.shape == (6, 50)
    for k in range(3):
        assert (masks[2 * k] ^ masks[2 * k + 1]).all()  # complements
        t = 1 / weights[2 * k]
        assert LOW <= t <= HIGH and 1 / weights[2 * k + 1] == pytest.approx(1 - t)
    single, _ = draw_masks(50, 3, "single", LOW, generator)
    assert not all((single[2 * k] ^ single[2 * k + 1]).all() for k in range(3))  # independent draws overlap
    with pytest.raises(ValueError, match=r"lower bound must be in \(0, 0.5\]"):
        draw_masks(50, 1, "coupled", 0.6, generator)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_dllm(seed=0)
    return model, tokenizer


def _exact_expectation(model, prompt: list[int], canvas: list[int], mask_id: int) -> list[float]:
    """E[s_j] computed exactly: every mask of the 3-position canvas, the mask ratio integrated over [LOW, HIGH]."""
    logp: dict[tuple[int, ...], torch.Tensor] = {}
    for size in range(1, len(canvas) + 1):
        for subset in itertools.combinations(range(len(canvas)), size):
            ids = prompt + [mask_id if j in subset else c for j, c in enumerate(canvas)]
            with torch.no_grad():
                logits = model.forward_packed(torch.tensor(ids), [len(ids)])
            logp[subset] = torch.log_softmax(logits.double(), -1)
    grid = torch.linspace(LOW, HIGH, 4001, dtype=torch.float64)
    exact = []
    for j in range(len(canvas)):
        integrand = torch.zeros_like(grid)
        for subset, lp in logp.items():
            if j in subset:  # P(M | t) / t = t^(|M| - 1) (1 - t)^(n - |M|)
                weight = grid ** (len(subset) - 1) * (1 - grid) ** (len(canvas) - len(subset))
                integrand += weight * lp[len(prompt) + j - 1, canvas[j]]
        exact.append(float(torch.trapezoid(integrand, grid) / (HIGH - LOW)))
    return exact


def test_coupled_and_single_mask_estimates_share_the_exact_expectation_and_coupled_varies_less(tiny):
    model, tokenizer = tiny
    config = model.config
    prompt = tokenizer("def add(a, b):", add_special_tokens=False).input_ids
    response = tokenizer(" return", add_special_tokens=False).input_ids[:2]
    canvas = response + [config.eos_token_id] * (3 - len(response))
    exact = _exact_expectation(model, prompt, canvas, config.mask_token_id)
    n = 3000
    estimates = {}
    for estimator in ("coupled", "single"):
        batch = canvas_batch([prompt] * n, [response] * n, [3] * n, config.eos_token_id, 1, estimator, LOW,
                             seeds=list(range(n)))
        with torch.no_grad():
            estimate, _ = estimate_logprobs(model, batch, config.mask_token_id)
        estimates[estimator] = estimate[:, :len(response) + 1].double()
    for estimator, values in estimates.items():
        mean, stderr = values.mean(0), values.std(0) / math.sqrt(n)
        for j in range(len(response) + 1):
            assert abs(float(mean[j]) - exact[j]) < 4 * float(stderr[j]), (estimator, j, float(mean[j]), exact[j])
    coupled, single = estimates["coupled"].var(0), estimates["single"].var(0)
    assert (coupled < single).all(), (coupled, single)
    total_ratio = float(estimates["coupled"].sum(1).var() / estimates["single"].sum(1).var())
    assert total_ratio < 0.8, total_ratio


class _Logits(torch.nn.Module):
    """Every row's logits are [theta, 0, 0, 0]: log p(token 0) = theta - log(e^theta + 3)."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))

    def forward_packed(self, input_ids, lengths, logit_rows):
        return torch.cat([self.theta.view(1, 1), torch.zeros(1, 3)], dim=1).expand(len(logit_rows), 4)


def test_estimate_and_loss_by_hand():
    # One response [0] on a canvas of 2 (then EOS = 0): both positions scored. Pair: t = 0.25 masks position 0,
    # its complement (t = 0.75) position 1, so c_0 = 1/2 * 4 * log p and c_1 = 1/2 * 4/3 * log p.
    batch = CanvasBatch(prompt_ids=[[3, 2]], targets=torch.tensor([[0, 0]]), canvas=[2],
                        response_mask=torch.ones(1, 2), masks=torch.tensor([[[True, False], [False, True]]]),
                        weights=torch.tensor([[4.0, 4.0 / 3.0]]))
    old, _ = estimate_logprobs(_Logits(0.0), batch, mask_id=1)
    new, _ = estimate_logprobs(_Logits(0.5), batch, mask_id=1)
    logp_old, logp_new = -math.log(4), 0.5 - math.log(math.exp(0.5) + 3)
    assert old[0].tolist() == pytest.approx([2 * logp_old, 2 / 3 * logp_old])
    assert new[0].tolist() == pytest.approx([2 * logp_new, 2 / 3 * logp_new])
    loss, stats = grpo_plus_loss(new, old, torch.tensor([1.0]), batch.response_mask, torch.tensor([False]))
    r0, r1 = math.exp(2 * (logp_new - logp_old)), math.exp(2 / 3 * (logp_new - logp_old))
    assert r0 > 1.28 > r1 > 1  # the first token's ratio is clipped (clip-high), the second's is not
    assert loss.item() == pytest.approx(-(1.28 + r1) / 2)
    assert stats.clip_fraction == pytest.approx(0.5) and stats.tokens == 2
    # A negative advantage: min(r A, clip(r) A) takes the unclipped -r0 (no upper clip for A < 0).
    loss, _ = grpo_plus_loss(new, old, torch.tensor([-1.0]), batch.response_mask, torch.tensor([False]))
    assert loss.item() == pytest.approx((r0 + r1) / 2)


def test_canvas_scores_the_response_and_its_eos_only():
    batch = canvas_batch([[5, 6]], [[7, 8, 9]], [6], eos_id=0, pairs=2, estimator="coupled", t_low=LOW, seeds=[1])
    assert batch.targets.tolist() == [[7, 8, 9, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1, 1, 0, 0]]
    assert batch.forwards == 4
    full = canvas_batch([[5]], [[7, 8]], [2], eos_id=0, pairs=1, estimator="coupled", t_low=LOW, seeds=[1])
    assert full.response_mask.tolist() == [[1, 1]]  # no room for an EOS: truncated, and scored as far as it goes
    with pytest.raises(ValueError, match="a response of 3 tokens on a canvas of 2"):
        canvas_batch([[5]], [[7, 8, 9]], [2], 0, 1, "coupled", LOW, [1])


def test_zero_advantage_groups_are_replaced_by_groups_with_signal():
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0])
    order = substitute_zero_advantage(rewards, 4, torch.Generator().manual_seed(0))
    groups = [order[g * 4:(g + 1) * 4] for g in range(4)]
    assert groups[0] == [0, 1, 2, 3] and groups[3] == [12, 13, 14, 15]  # groups with signal stay
    for g in (1, 2):
        assert groups[g] in ([0, 1, 2, 3], [12, 13, 14, 15])
    assert substitute_zero_advantage(torch.ones(8), 4, torch.Generator()) == list(range(8))  # nothing to copy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_dllm(tmp_path_factory.mktemp("dllm") / "model", seed=0, init_std=0.02)


def test_warm_start_learns_and_the_export_loads_in_the_serving_layout(checkpoint, tmp_path):
    policy = DllmPolicy(str(checkpoint), canvas_tokens=32)
    losses = policy.warm_start(train_problems(), steps=40, batch=8, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    weights = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    loaded = load_dllm(policy.save(tmp_path / "export", weights))
    assert all(torch.equal(loaded.state_dict()[k], weights[k]) for k in weights)


def test_a_grpo_step_on_a_diffusion_policy_moves_it_toward_the_rewarded_answer(checkpoint):
    policy = DllmPolicy(str(checkpoint), canvas_tokens=16, mask_pairs=2)
    prompt = policy.tokenizer(policy.prompt("say yes"), add_special_tokens=False).input_ids
    good, bad = (policy.tokenizer(w, add_special_tokens=False).input_ids for w in ("yes", "no"))
    samples = [Sample(0, prompt, good if i % 2 == 0 else bad, "", False, 16) for i in range(4)]
    samples += [Sample(1, prompt, bad, "", False, 16) for _ in range(4)]  # a group without signal
    cfg = TrainConfig.model_validate(dict(
        model={"path": str(checkpoint), "family": "dllm"}, data={"train": "toy"},
        rollout={"backend": "served", "app_name": "dllm", "served_model": "tiny-dllm", "group_size": 4},
        algorithm={"lr": 1e-3, "substitute_zero_advantage": True},
        context_schedule=[{"from_step": 0, "max_response_tokens": 16}], steps=1))

    def score(response: list[int]) -> float:
        batch = canvas_batch([prompt] * 64, [response] * 64, [16] * 64, policy.eos_id, 1, "coupled", LOW,
                             list(range(64)))
        with torch.no_grad():
            return float(estimate_logprobs(policy.model, batch, policy.mask_id)[0].sum(1).mean())

    before = score(good) - score(bad)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr)
    metrics = grpo_update(policy, optimizer, samples, [1.0, 0.0, 1.0, 0.0] + [0.0] * 4, cfg, seed=0)
    assert metrics["groups_substituted"] == 1 and metrics["groups_with_signal"] == 0.5
    assert score(good) - score(bad) > before + 0.1
