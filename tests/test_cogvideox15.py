"""CogVideoX 1.5 (temporal patches of 2 latent frames) in the packed engine, against `CogVideoXPipeline` (fp32)."""

from __future__ import annotations

import torch

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.request import RequestStatus
from models import load_adapter
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec

V15 = tiny_spec("cogvideox", name="cogvideox15-tiny", tiny_variant="cogvideox1.5")


def _prompts(*texts: str):
    return TextEncoderCore([V15]).encode_batch([EncodeRequest(V15.name, t, "") for t in texts])


def test_latents_are_padded_to_whole_temporal_patches():
    adapter = load_adapter(V15, parts=())
    assert adapter.geometry.patch_size_t == 2
    assert adapter.latent_shape(32, 48, 9)[0] == 4  # 3 latent frames + 1 padding frame, as the pipeline pads
    assert adapter.geometry.seq_len(32, 48, 9) == 2 * 2 * 3 + 16  # 2 temporal patches x 2 x 3 + 16 text tokens


def test_engine_matches_cogvideox_pipeline_and_decodes_the_requested_frames():
    (prompt,) = _prompts("a cat on the moon")
    engine = Engine([V15])
    engine.admit("x", gen_spec(V15.name, steps=5, frames=9, seed=3, guidance=6.0), prompt)
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    pipeline = load_adapter(V15, parts=("text", "transformer", "vae")).pipeline
    reference = pipeline(prompt="a cat on the moon", negative_prompt="", height=32, width=48, num_frames=9,
                         num_inference_steps=5, guidance_scale=6.0, generator=torch.Generator().manual_seed(3),
                         output_type="latent", max_sequence_length=16).frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    frames = load_adapter(V15, parts=("vae",)).decode(engine.latents["x"])
    assert frames.shape == (1, 9, 32, 48, 3)


def test_packed_with_other_shapes_equals_alone():
    target_prompt, other_prompt = _prompts("a cat on the moon", "red car at night")
    assert_joined_late_equals_alone(
        V15, (gen_spec(V15.name, steps=4, height=32, width=48, frames=9, seed=7), target_prompt),
        (gen_spec(V15.name, steps=6, height=240, width=416, frames=17, seed=1), other_prompt))
