"""LTX-Video in the packed engine, against `LTXPipeline`'s own loop on a tiny random config (fp32)."""

from __future__ import annotations

from dataclasses import replace

import torch

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.request import RequestStatus
from models import load_adapter
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec
from tests.spmd_cases import assert_two_ranks_equal_one_rank

LTX = tiny_spec("ltx", default_fps=25)


def _prompts(*texts: str):
    return TextEncoderCore([LTX]).encode_batch([EncodeRequest(LTX.name, t, "") for t in texts])


def _spec(fps: int = 25, **kwargs):
    return replace(gen_spec(LTX.name, **{"height": 32, "width": 64, "frames": 9, **kwargs}), fps=fps)


def test_geometry_is_32x_spatial_8x_temporal():
    adapter = load_adapter(LTX, parts=())
    assert (adapter.geometry.spatial_factor, adapter.geometry.temporal_factor) == (32, 8)
    assert adapter.latent_shape(32, 64, 17) == (8, 3, 1, 2)


def test_engine_matches_ltx_pipeline_at_the_requests_frame_rate():
    (prompt,) = _prompts("a cat on the moon")
    pipeline = load_adapter(LTX, parts=("text", "transformer", "vae")).pipeline
    videos = {}
    for fps in (25, 12):
        engine = Engine([LTX])
        engine.admit("x", _spec(fps, steps=5, frames=17, seed=3, guidance=3.0), prompt)
        engine.run()
        assert engine.done["x"].status is RequestStatus.FINISHED
        reference = pipeline(prompt="a cat on the moon", negative_prompt="", height=32, width=64, num_frames=17,
                             frame_rate=fps, num_inference_steps=5, guidance_scale=3.0, output_type="latent",
                             generator=torch.Generator().manual_seed(3), max_sequence_length=16).frames
        shape = engine.latents["x"].shape  # (1, C, F, H, W); the pipeline returns the same latents packed
        unpacked = pipeline._unpack_latents(reference, shape[2], shape[3], shape[4])
        torch.testing.assert_close(engine.latents["x"], unpacked, rtol=0, atol=1e-5)
        videos[fps] = engine.latents["x"]
    assert (videos[25] - videos[12]).abs().max() > 1e-3  # the frame rate conditions the RoPE
    frames = load_adapter(LTX, parts=("vae",)).decode(engine.latents["x"])
    assert frames.shape == (1, 17, 32, 64, 3)


def test_packed_with_other_shapes_and_frame_rates_equals_alone():
    target_prompt, other_prompt = _prompts("a cat on the moon", "red car at night")
    assert_joined_late_equals_alone(LTX, (_spec(steps=4, seed=7), target_prompt),
                                    (_spec(12, steps=6, height=64, frames=17, seed=1), other_prompt))


def test_two_ranks_equal_one_rank():
    asks = [("big", _spec(steps=3, height=128, width=192, frames=17, seed=1)),
            ("small", _spec(steps=2, seed=2, guidance=1.0))]
    assert_two_ranks_equal_one_rank([LTX], asks, 8)
