"""HunyuanVideo 1.5 (dual-stream, Qwen2.5-VL and ByT5 text, token refiner) in the packed engine, against diffusers'
`HunyuanVideo15Pipeline` and `HunyuanVideo15ImageToVideoPipeline` (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline
from diffusers.guiders import ClassifierFreeGuidance

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.request import RequestStatus
from models import load_adapter
from models.hunyuanvideo15 import configure_tiny_text
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec, noise_picture
from tests.spmd_cases import assert_two_ranks_equal_one_rank

HY = tiny_spec("hunyuanvideo15", name="hunyuanvideo15-tiny")
HY_I2V = tiny_spec("hunyuanvideo15", name="hunyuanvideo15-i2v-tiny", tiny_variant="i2v")
QUOTING = 'a shop sign that reads "OPEN" at night'


def _prompts(*texts: str, spec=HY):
    return TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, t, "") for t in texts])


def _reference(adapter, guidance: float):
    """The adapter's pipeline class over its components, the guider at the request's scale, the tiny prompt layout."""
    components = {**adapter.pipeline.components, "guider": ClassifierFreeGuidance(guidance_scale=guidance)}
    pipeline = type(adapter.pipeline)(**components)
    configure_tiny_text(pipeline, HY.max_sequence_length)
    return pipeline


def test_a_prompt_keeps_only_its_valid_tokens_and_quoted_text_adds_glyph_tokens():
    plain, quoting = _prompts("a cat on the moon", QUOTING)
    assert plain.cond["glyph_hidden_states"].shape[1] == 0 and quoting.cond["glyph_hidden_states"].shape[1] > 0
    text = plain.cond["encoder_hidden_states"]
    assert 0 < text.shape[1] <= HY.max_sequence_length and text.shape[2] == 32
    adapter = load_adapter(HY, parts=())
    shape = adapter.latent_shape(32, 48, 9)
    assert shape == (4, 3, 2, 3)
    quoted = quoting.cond["encoder_hidden_states"].shape[1] + quoting.cond["glyph_hidden_states"].shape[1]
    assert adapter.row_tokens(shape, quoting.cond) == 3 * 2 * 3 + quoted


@pytest.mark.parametrize("prompt", ["a cat on the moon", QUOTING], ids=["text", "glyph"])
def test_engine_matches_the_hunyuanvideo15_pipeline(prompt):
    (encoded,) = _prompts(prompt)
    spec = gen_spec(HY.name, steps=4, frames=9, seed=3, guidance=6.0, prompt=prompt)
    engine = Engine([HY])
    engine.admit("x", spec, encoded)
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    adapter = load_adapter(HY, parts=("text", "transformer", "vae"))
    reference = _reference(adapter, 6.0)(
        prompt=prompt, negative_prompt="", height=32, width=48, num_frames=9, num_inference_steps=4,
        generator=torch.Generator().manual_seed(3), output_type="latent").frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    frames = load_adapter(HY, parts=("vae",)).decode(engine.latents["x"])
    assert frames.shape == (1, 9, 32, 48, 3)


def test_packed_with_other_shapes_equals_alone():
    target_prompt, other_prompt = _prompts("a cat on the moon", QUOTING)
    assert_joined_late_equals_alone(
        HY, (gen_spec(HY.name, steps=4, height=32, width=48, frames=9, seed=7), target_prompt),
        (gen_spec(HY.name, steps=6, height=48, width=32, frames=17, seed=1), other_prompt))


def test_two_ranks_equal_one_rank():
    asks = [("big", gen_spec(HY.name, steps=3, height=64, width=96, frames=17, seed=1)),
            ("small", gen_spec(HY.name, steps=2, seed=2, guidance=1.0))]
    assert_two_ranks_equal_one_rank([HY], asks, 8)


def test_checkpoint_round_trip(tmp_path):
    reference = load_adapter(HY, parts=("text", "transformer", "vae"))
    reference.pipeline.save_pretrained(tmp_path)
    saved = HY.model_copy(update={"source": str(tmp_path)})
    (prompt,) = _prompts("a cat")
    spec = gen_spec(HY.name, steps=3)
    runs = []
    for source in (HY, saved):
        engine = Engine([source])
        engine.admit("x", spec, prompt)
        engine.run()
        runs.append(engine.latents["x"])
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


def _with_image(prompt, image, height: int = 32, width: int = 48):
    """The prompt with the image's latents and SigLIP tokens, as the job's pipeline hands it to the scheduler."""
    return prompt.with_condition(load_adapter(HY_I2V, parts=("vae",)).encode_image(image, height, width, 9, 0))


def test_image_to_video_matches_its_pipeline():
    """The image's latents condition the first latent frame (mask 1 there), its 729 SigLIP tokens join the text."""
    (prompt,) = _prompts("a cat on the moon", spec=HY_I2V)
    image = noise_picture(0, width=48, height=32)  # the pipeline sizes the video from the image: 32 x 48 here
    conditioned = _with_image(prompt, image)
    assert conditioned.cond["image_latents"].shape == (1, 4, 1, 2, 3)
    assert conditioned.cond["image_embeds"].shape == (1, 729, 16)
    engine = Engine([HY_I2V])
    engine.admit("x", gen_spec(HY_I2V.name, steps=4, seed=3, guidance=6.0), conditioned)
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    adapter = load_adapter(HY_I2V, parts=("text", "transformer", "vae"))
    pipeline = _reference(adapter, 6.0)
    assert isinstance(pipeline, HunyuanVideo15ImageToVideoPipeline)
    reference = pipeline(image=image, prompt="a cat on the moon", negative_prompt="", num_frames=9,
                         num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="latent").frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    other = Engine([HY_I2V])
    other.admit("y", gen_spec(HY_I2V.name, steps=4, seed=3, guidance=6.0),
                _with_image(prompt, noise_picture(1, width=48, height=32)))
    other.run()
    assert (other.latents["y"] - engine.latents["x"]).abs().max() > 1e-3  # the image conditions the video


def test_image_rows_packed_with_other_shapes_equal_alone():
    target, other = _prompts("a cat on the moon", QUOTING, spec=HY_I2V)
    assert_joined_late_equals_alone(
        HY_I2V, (gen_spec(HY_I2V.name, steps=4, seed=7), _with_image(target, noise_picture(2))),
        (gen_spec(HY_I2V.name, steps=6, height=48, width=32, frames=17, seed=1),
         _with_image(other, noise_picture(3, 64, 64), height=48, width=32)))


def test_the_text_to_video_checkpoint_refuses_an_image():
    assert not load_adapter(HY, parts=()).image_to_video and load_adapter(HY_I2V, parts=()).image_to_video
    with pytest.raises(ValueError, match="not an image-to-video model"):
        load_adapter(HY, parts=("vae",)).encode_image(noise_picture(0), 32, 48, 9, 0)
