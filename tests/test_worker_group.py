"""The sharded engine without Serve: the scheduler plans Brick rings every step, ranks of a gloo group run them."""

from __future__ import annotations

import torch

from common.spmd import run_spmd
from tests.conftest import tiny_spec
from tests.factories import gen_spec
from tests.spmd_cases import engine_group_case

ASKS = [  # two models, four sizes, CFG and not, different step counts
    ("big", gen_spec("cogvideox-tiny", steps=3, height=96, width=160, frames=17, seed=1, prompt="a big city")),
    ("small", gen_spec("cogvideox-tiny", steps=4, height=32, width=48, frames=1, seed=2, prompt="a cat")),
    ("mid", gen_spec("wan-tiny", steps=3, height=64, width=112, frames=9, seed=3, guidance=1.0, prompt="waves")),
    ("wan-small", gen_spec("wan-tiny", steps=2, height=32, width=48, frames=5, seed=4, prompt="a red car")),
]


def test_two_ranks_with_mixed_rings_equal_one_rank():
    """A bad request packed among them fails alone, on every rank, before any collective."""
    bad = ("bad", gen_spec("cogvideox-tiny", steps=3, height=64, width=112, frames=9, seed=5, prompt="x"))
    payload = ([tiny_spec("cogvideox"), tiny_spec("wan")], [*ASKS[:2], bad, *ASKS[2:]], 64, {"bad"})
    (alone,) = run_spmd(1, engine_group_case, payload)
    ranks = run_spmd(2, engine_group_case, payload)
    assert alone["rings"] == {1} and all(r["rings"] == {1, 2} for r in ranks)  # 1-rank and 2-rank rings
    assert all(r["ring_bytes"] > 0 for r in ranks)
    for r in (alone, *ranks):
        assert list(r["errors"]) == ["bad"] and "width 7" in r["errors"]["bad"]
    for request_id, _ in ASKS:
        for r in ranks:  # replicated state: every rank holds the same final latents
            torch.testing.assert_close(r["latents"][request_id], alone["latents"][request_id], atol=1e-4, rtol=1e-4)
