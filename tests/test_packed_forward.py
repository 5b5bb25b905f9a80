"""Packed DiT forward (CogVideoX, Wan) equals diffusers' forward on each request alone,
in one process and sharded with Brick Attention over 2 and 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from attention.plan import BrickPlan, RingAssignment, even_bounds
from attention.planner import BrickCostModel, plan_brick
from attention.spmd import run_spmd
from deployments.models import load_adapter, packed_cogvideox, packed_wan
from deployments.models.packed import PackedRequest
from tests.conftest import tiny_spec
from tests.spmd_cases import packed_forward_cases

MODULES = {"wan": packed_wan, "cogvideox": packed_cogvideox}
# (latent frames, latent height, latent width, timestep, text tokens): mixed shapes, timesteps, text lengths.
SHAPES = [(3, 4, 6, 999.0, 16), (1, 8, 8, 10.0, 12), (2, 6, 4, 500.0, 16), (5, 2, 2, 250.0, 7)]


@pytest.fixture(scope="module", params=["wan", "cogvideox"])
def family_setup(request):
    family = request.param
    adapter = load_adapter(tiny_spec(family), ["transformer"])
    model = adapter.pipeline.transformer
    g = torch.Generator().manual_seed(7)
    requests = []
    for f, h, w, t, text in SHAPES:
        if family == "wan":
            latents = torch.randn(model.config.in_channels, f, h, w, generator=g)
            requests.append(PackedRequest(latents, torch.tensor(t), torch.randn(text, model.config.text_dim, generator=g)))
        else:
            adapter.pipeline.vae_scale_factor_spatial = adapter.geometry.spatial_factor
            rotary = adapter.pipeline._prepare_rotary_positional_embeddings(
                h * adapter.geometry.spatial_factor, w * adapter.geometry.spatial_factor, f, "cpu")
            latents = torch.randn(f, model.config.in_channels, h, w, generator=g)
            text_states = torch.randn(text, model.config.text_embed_dim, generator=g)
            requests.append(PackedRequest(latents, torch.tensor(t), text_states, rotary))
    with torch.no_grad():
        alone = [_diffusers_alone(family, model, r) for r in requests]
    return family, model, requests, alone


def _diffusers_alone(family, model, r: PackedRequest) -> torch.Tensor:
    if family == "wan":
        return model(r.latents[None], r.timestep.reshape(1), r.text[None], return_dict=False)[0][0]
    return model(r.latents[None], r.text[None], r.timestep.reshape(1), image_rotary_emb=r.rotary,
                 return_dict=False)[0][0]


def test_packed_forward_equals_diffusers_per_request(family_setup):
    family, model, requests, alone = family_setup
    with torch.no_grad():
        packed = MODULES[family].forward_packed(model, requests)
    for got, ref in zip(packed, alone):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _plans(counts, world):
    planned = plan_brick(counts, world, BrickCostModel(min_shard_tokens=8, linear_tokens=8))
    # Every request on one ring of all ranks, in reverse rank order; and mixed rings sharing ranks.
    reverse = BrickPlan(world, tuple(RingAssignment(i, tuple(reversed(range(world))), even_bounds(n, world))
                                     for i, n in enumerate(counts)))
    mixed = BrickPlan(world, tuple(RingAssignment(i, ranks, even_bounds(n, len(ranks))) for i, (n, ranks) in
                                   enumerate(zip(counts, [tuple(range(world)), (1, 0), (1,), (0, world - 1)]))))
    return [planned, reverse, mixed]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_packed_forward_equals_diffusers_per_request(family_setup, world):
    family, model, requests, alone = family_setup
    module = MODULES[family]
    counts = module.token_counts(model, requests)
    plans = _plans(counts, world)
    assert len({a.size for a in plans[0].assignments}) > 1  # the planner mixed ring sizes here
    results = run_spmd(world, packed_forward_cases, (family, requests, plans))
    for p in range(len(plans)):
        per_rank = [rank_results[p] for rank_results in results]
        for i, request in enumerate(requests):
            pieces = sorted(rank_rows[i] for rank_rows in per_rank if i in rank_rows)
            rows = torch.cat([rows for _, rows in pieces])
            assert [start for start, _ in pieces] == sorted(start for start, _ in pieces) and len(rows) == counts[i]
            torch.testing.assert_close(module.unpatchify(model, request, rows), alone[i], atol=1e-4, rtol=1e-4)
