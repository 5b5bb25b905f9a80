"""Packed DiT forward of all four families equals diffusers' forward on each request alone,
in one process and (single-stream and MMDiT alike) sharded with Brick Attention over 2 and 4 gloo ranks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attention.plan import BrickPlan, RingAssignment, even_bounds
from attention.planner import BrickCostModel, plan_brick
from common.spmd import run_spmd
from deployments.text_encoder import EncodeRequest, TextEncoderCore
from models import load_adapter
from models.packed import forward_packed
from tests.conftest import tiny_spec
from tests.spmd_cases import packed_forward_cases

FAMILIES = ["cogvideox", "wan", "mochi", "sd3"]
# (height, width, frames, step index, text tokens kept): mixed shapes, timesteps and text lengths.
SHAPES = [(32, 48, 9, 0, 16), (64, 64, 1, 4, 12), (48, 32, 17, 2, 16), (16, 16, 13, 3, 7)]
PROMPTS = ["a cat on the moon", "red car", "a bird flying over the dark ocean at sunset", "x"]


def diffusers_alone(family, model, r) -> torch.Tensor:
    """diffusers' own forward of one request (batch of one)."""
    text, t = r.text[None], r.timestep.reshape(1)
    if family == "wan":
        out = model(r.latents[None], t, text, return_dict=False)
    elif family == "cogvideox":
        out = model(r.latents[None], text, t, image_rotary_emb=r.rotary, return_dict=False)
    elif family == "mochi":
        mask = torch.ones(1, len(r.text), dtype=torch.bool)
        out = model(r.latents[None], text, t, mask, return_dict=False)
    else:
        out = model(r.latents[None], text, r.pooled[None], t, return_dict=False)
    return out[0][0]


def packed_inputs(family, spec=None):
    spec = spec or tiny_spec(family)
    adapter = load_adapter(spec, ["transformer"])
    prompts = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, p, None) for p in PROMPTS])
    g = torch.Generator().manual_seed(7)
    requests = []
    for (height, width, frames, step, text), prompt in zip(SHAPES, prompts):
        frames = 1 if family == "sd3" else (frames - 1) // 6 * 6 + 1 if family == "mochi" else frames
        shape = adapter.latent_shape(height, width, frames)
        t = adapter.new_sampler(5, shape).timesteps[step]
        r = adapter.packed_request(torch.randn(shape, generator=g), t, prompt.cond)
        requests.append(r if family == "mochi" else replace(r, text=r.text[:text]))  # Mochi: its mask decides
    return adapter, requests


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    family = request.param
    adapter, requests = packed_inputs(family)
    with torch.no_grad():
        alone = [diffusers_alone(family, adapter.transformer, r) for r in requests]
    return family, adapter, requests, alone


def test_packed_forward_equals_diffusers_per_request(family_setup):
    family, adapter, requests, alone = family_setup
    assert len({r.latents.shape for r in requests}) == len(requests)
    assert len({len(r.text) for r in requests}) > 1
    with torch.no_grad():
        packed = forward_packed(adapter.packed_module, adapter.transformer, requests)
    for got, ref in zip(packed, alone):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sd35_dual_attention_blocks():
    """SD3.5's dual-attention (image-only attn2) and qk-norm blocks, as in SD3.5 Medium."""
    spec = tiny_spec("sd3")
    adapter, requests = packed_inputs("sd3", spec)
    config = dict(adapter.transformer_config, dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(0)
    model = type(adapter.transformer)(**config).eval()
    with torch.no_grad():
        packed = forward_packed(adapter.packed_module, model, requests)
        for got, r in zip(packed, requests):
            torch.testing.assert_close(got, diffusers_alone("sd3", model, r), atol=1e-5, rtol=1e-5)


def _plans(counts, world):
    planned = plan_brick(counts, world, BrickCostModel(min_shard_tokens=8, linear_tokens=8))
    # Every request on one ring of all ranks, in reverse rank order; and mixed rings sharing ranks.
    reverse = BrickPlan(world, tuple(RingAssignment(i, tuple(reversed(range(world))), even_bounds(n, world))
                                     for i, n in enumerate(counts)))
    mixed = BrickPlan(world, tuple(RingAssignment(i, ranks, even_bounds(n, len(ranks))) for i, (n, ranks) in
                                   enumerate(zip(counts, [tuple(range(world)), (1, 0), (1,), (0, world - 1)]))))
    return [planned, reverse, mixed]


# Four ranks (rings of 1, 2 and 4 overlapping in any order) take ~25 s a family on 2 cores: behind `slow`; two ranks
# (rings of 1 and 2 sharing ranks, reversed, planned) stay in the default run.
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_packed_forward_equals_diffusers_per_request(family_setup, world):
    family, adapter, requests, alone = family_setup
    module, model = adapter.packed_module, adapter.transformer
    counts = module.token_counts(model, requests)
    plans = _plans(counts, world)
    assert len({a.size for a in plans[0].assignments}) > 1  # the planner mixed ring sizes here
    results = run_spmd(world, packed_forward_cases, (family, requests, plans))
    for p in range(len(plans)):
        per_rank = [rank_results[p] for rank_results in results]
        for i, request in enumerate(requests):
            pieces = sorted(rank_rows[i] for rank_rows in per_rank if i in rank_rows)
            rows = torch.cat([rows for _, rows in pieces])
            assert [start for start, _ in pieces] == sorted(start for start, _ in pieces)
            torch.testing.assert_close(module.unpatchify(model, request, rows), alone[i], atol=1e-4, rtol=1e-4)
