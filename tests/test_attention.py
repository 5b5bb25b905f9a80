"""Varlen, ring and Brick attention equal full attention per sequence (CPU, spawned gloo ranks)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from attention.plan import BrickPlan, RingAssignment, even_bounds, single_ring_plan
from attention.planner import BrickCostModel, plan_brick
from attention.varlen import merge_partials, varlen_attention
from common.spmd import run_spmd
from tests.spmd_cases import brick_cases, scatter_back

HEADS, DIM = 2, 16


def reference(q, k, v):
    """Per-sequence SDPA and the exact log-sum-exp of the scaled scores."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
    lse = torch.logsumexp((q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
    return out, lse.transpose(0, 1)


def packed(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HEADS, DIM, generator=g) for n in lengths]


@pytest.mark.parametrize("backend", ["sdpa", "block_diagonal"])
def test_varlen_equals_per_sequence_sdpa_for_self_and_cross_attention(backend):
    q_lens, k_lens = [7, 1, 33, 12], [7, 20, 5, 12]
    qs, ks, vs = packed(q_lens, 0), packed(k_lens, 1), packed(k_lens, 2)
    cu_q = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
    out, lse = varlen_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k, backend=backend)
    for i in range(len(q_lens)):
        ref_out, ref_lse = reference(qs[i], ks[i], vs[i])
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[cu_q[i]:cu_q[i + 1]], ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("backend", ["sdpa", "block_diagonal"])
def test_sequence_without_keys_gives_zero_and_minus_inf(backend):
    q, k = torch.randn(5, HEADS, DIM), torch.randn(3, HEADS, DIM)
    out, lse = varlen_attention(q, k, k, [0, 2, 5], [0, 3, 3], backend=backend)
    assert torch.all(out[2:] == 0) and torch.all(lse[2:] == -math.inf)
    with pytest.raises(ValueError, match="offsets end at"):
        varlen_attention(q, k, k, [0, 4], [0, 3])


CUDA_BACKENDS = [("sdpa", torch.float32), ("sdpa", torch.bfloat16), ("torch_varlen", torch.bfloat16),
                 ("auto", torch.bfloat16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kernels need a CUDA device")
@pytest.mark.parametrize("backend,dtype", CUDA_BACKENDS)
def test_cuda_varlen_backends_equal_the_fp32_reference(backend, dtype):
    """The fused GPU kernels (never a materialised score matrix) against per-sequence fp32 math, keyless included."""
    q_lens, k_lens = [7, 1, 300, 12, 4], [7, 20, 257, 12, 0]
    qs, ks, vs = (packed(lens, seed) for lens, seed in ((q_lens, 0), (k_lens, 1), (k_lens, 2)))
    q, k, v = (torch.cat(t).to("cuda", dtype) for t in (qs, ks, vs))
    cu_q, cu_k = ([0, *torch.tensor(lens).cumsum(0).tolist()] for lens in (q_lens, k_lens))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i in range(len(q_lens) - 1):
        ref_out, ref_lse = reference(*(t[a:b].float() for t, a, b in ((q, cu_q[i], cu_q[i + 1]),
                                                                        (k, cu_k[i], cu_k[i + 1]),
                                                                        (v, cu_k[i], cu_k[i + 1]))))
        torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]].float(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse[cu_q[i]:cu_q[i + 1]], ref_lse, atol=tol, rtol=tol)
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert torch.all(out[cu_q[-2]:] == 0) and torch.all(lse[cu_q[-2]:] == -math.inf)


def test_merging_key_blocks_in_any_order_equals_full_attention():
    q, k, v = torch.randn(9, HEADS, DIM), torch.randn(40, HEADS, DIM), torch.randn(40, HEADS, DIM)
    full_out, full_lse = reference(q, k, v)
    cuts = [0, 3, 3, 17, 40]  # an empty block included
    out, lse = torch.zeros(9, HEADS, DIM), torch.full((9, HEADS), -math.inf)
    for a, b in reversed(list(zip(cuts, cuts[1:]))):
        block = varlen_attention(q, k[a:b], v[a:b], [0, 9], [0, b - a])
        out, lse = merge_partials(out, lse, *block)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def _random_plan(rng: random.Random, world: int, n_requests: int) -> BrickPlan:
    sizes = [s for s in (1, 2, 4) if s <= world]
    assignments = []
    for i in range(n_requests):
        size = rng.choice(sizes)
        ranks = tuple(rng.sample(range(world), size))  # any order: rings need not follow rank order
        tokens = rng.randint(1, 70)  # often not divisible by the ring size, sometimes shorter than it
        assignments.append(RingAssignment(i, ranks, even_bounds(tokens, size)))
    return BrickPlan(world, tuple(assignments))


def _cases(plans, seed):
    cases = []
    for j, plan in enumerate(plans):
        lens = [a.tokens for a in plan.assignments]
        cases.append((plan, packed(lens, seed + 3 * j), packed(lens, seed + 3 * j + 1), packed(lens, seed + 3 * j + 2)))
    return cases


def _check(world, cases):
    per_rank = run_spmd(world, brick_cases, cases)
    for c, (plan, q, k, v) in enumerate(cases):
        outs = scatter_back(plan, [per_rank[r][c][0] for r in range(world)], q)
        for i in range(len(q)):
            torch.testing.assert_close(outs[i], reference(q[i], k[i], v[i])[0], atol=1e-5, rtol=1e-5)
    return per_rank


@pytest.mark.parametrize("world", [2, 4])
def test_brick_attention_equals_full_attention_on_random_heterogeneous_batches(world):
    rng = random.Random(world)
    plans = [_random_plan(rng, world, rng.randint(1, 7)) for _ in range(6)]
    # A rank in several rings of different sizes at once, and a lone rank-1 ring.
    plans.append(BrickPlan(world, (RingAssignment(0, tuple(range(world)), even_bounds(37, world)),
                                   RingAssignment(1, (1, 0), even_bounds(20, 2)),
                                   RingAssignment(2, (1,), even_bounds(9, 1)))))
    assert any(sum(r in a.ranks for a in p.assignments) > 1 for p in plans for r in range(world))
    _check(world, _cases(plans, seed=world))


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_and_planned_bricks_equal_full_attention(world):
    ring = single_ring_plan([45, 8, 101], world)
    planned = plan_brick([300, 17, 64, 5, 129], world, BrickCostModel(min_shard_tokens=32, linear_tokens=16))
    assert {a.size for a in planned.assignments} != {1}
    per_rank = _check(world, _cases([ring, planned], seed=10 + world))
    # Traffic isolation: a rank sends only KV blocks of its own rings (nothing for rank-1 rings).
    solo = BrickPlan(world, tuple(RingAssignment(i, (i % world,), (0, 12)) for i in range(world)))
    solo_runs = run_spmd(world, brick_cases, _cases([solo], seed=5))
    assert all(sent == 0 for rank_results in solo_runs for (_, sent) in rank_results)
    assert all(per_rank[r][0][1] > 0 for r in range(world))
