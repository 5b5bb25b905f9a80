"""LTX-Video in the packed engine, against `LTXPipeline`'s own loop on a tiny random config (fp32)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.request import RequestStatus
from models import load_adapter
from models.step_cache import StepCache
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec, noise_picture
from tests.spmd_cases import assert_two_ranks_equal_one_rank

LTX = tiny_spec("ltx", default_fps=25)


def _prompts(*texts: str):
    return TextEncoderCore([LTX]).encode_batch([EncodeRequest(LTX.name, t, "") for t in texts])


def _spec(fps: int = 25, model: str = "ltx-tiny", **kwargs):
    return replace(gen_spec(model, **{"height": 32, "width": 64, "frames": 9, **kwargs}), fps=fps)


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


LTX_I2V = tiny_spec("ltx", name="ltx-i2v-tiny", default_fps=25, image_input=True)


def _ispec(fps: int = 25, **kwargs):
    return _spec(fps, model=LTX_I2V.name, **kwargs)


def _conditioned(prompt, image, spec):
    """The prompt with the image's latents, as the job's pipeline hands it to the scheduler."""
    cond = load_adapter(LTX_I2V, parts=("vae",)).encode_image(image, spec.height, spec.width, spec.num_frames, spec.seed)
    return prompt.with_condition(cond)


def test_image_to_video_matches_its_pipeline_and_keeps_the_first_frame():
    """`LTXImageToVideoPipeline`'s loop: the image's latents as the first latent frame (kept by every step), its
    tokens modulated at timestep 0. The pipeline draws the image's sample and the noise from one generator and the
    engine from two, so the image's latents are checked against the pipeline's own, then the loop from the engine's
    initial latents."""
    from diffusers import LTXImageToVideoPipeline

    adapter = load_adapter(LTX_I2V, parts=("text", "transformer", "vae"))
    assert adapter.image_to_video and not load_adapter(LTX, parts=()).image_to_video
    (prompt,) = _prompts("a cat on the moon")
    image, spec = noise_picture(0), _ispec(steps=5, frames=17, seed=3, guidance=3.0)
    pipeline = LTXImageToVideoPipeline(**adapter.pipeline.components)
    pixels = pipeline.video_processor.preprocess(image, height=32, width=64)
    theirs, _ = pipeline.prepare_latents(pixels, 1, 8, 32, 64, 17, torch.float32, torch.device("cpu"),
                                         torch.Generator().manual_seed(3))
    cond = adapter.encode_image(image, 32, 64, 17, 3)
    first = pipeline._unpack_latents(theirs, 3, 1, 2)[:, :, :1]
    torch.testing.assert_close(cond["image_latents"], first, rtol=0, atol=1e-6)

    engine = Engine([LTX_I2V])
    engine.admit("x", spec, prompt.with_condition(cond))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    shape = adapter.latent_shape(32, 64, 17)
    noise = adapter.initial_latents(shape, 3, adapter.new_sampler(5, shape))
    start = adapter.condition_latents(noise, cond)
    reference = pipeline(image=image, prompt="a cat on the moon", negative_prompt="", height=32, width=64,
                         num_frames=17, frame_rate=25, num_inference_steps=5, guidance_scale=3.0,
                         latents=pipeline._pack_latents(start), output_type="latent", max_sequence_length=16).frames
    torch.testing.assert_close(engine.latents["x"], pipeline._unpack_latents(reference, 3, 1, 2), rtol=0, atol=1e-5)
    assert torch.equal(engine.latents["x"][:, :, :1], cond["image_latents"])
    other = Engine([LTX_I2V])
    other.admit("y", spec, _conditioned(prompt, noise_picture(1), spec))
    other.run()
    assert (other.latents["y"] - engine.latents["x"])[:, :, 1:].abs().max() > 1e-3  # the image conditions the video


def test_image_to_video_packed_with_other_shapes_equals_alone():
    target_prompt, other_prompt = _prompts("a cat on the moon", "red car at night")
    target, other = _ispec(steps=4, seed=7), _ispec(12, steps=6, height=64, frames=17, seed=1)
    assert_joined_late_equals_alone(LTX_I2V, (target, _conditioned(target_prompt, noise_picture(2), target)),
                                    (other, _conditioned(other_prompt, noise_picture(3, 64, 64), other)))


def test_image_to_video_rows_on_two_ranks_equal_one_rank():
    """A big request's first frame (its clean tokens) on one shard of a ring of 2, the rest on the other."""
    asks = [("big", _ispec(steps=3, height=128, width=192, frames=17, seed=1)),
            ("small", _ispec(steps=2, seed=2, guidance=1.0))]
    assert_two_ranks_equal_one_rank([LTX_I2V], asks, 8)


def test_image_to_video_checkpoint_round_trip(tmp_path):
    reference = load_adapter(LTX_I2V, parts=("text", "transformer", "vae"))
    reference.pipeline.save_pretrained(tmp_path)
    saved = LTX_I2V.model_copy(update={"source": str(tmp_path)})
    image, spec = noise_picture(5), _ispec(steps=3, seed=4)
    (prompt,) = _prompts("a cat")
    runs = []
    for source in (LTX_I2V, saved):
        cond = load_adapter(source, parts=("vae",)).encode_image(image, 32, 64, 9, 4)
        engine = Engine([source])
        engine.admit("x", spec, prompt.with_condition(cond))
        engine.run()
        runs.append(engine.latents["x"])
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


def test_image_input_is_refused_where_image_to_video_is_its_own_checkpoint():
    with pytest.raises(ValueError, match="image_input is for checkpoints that run both pipelines"):
        load_adapter(tiny_spec("cogvideox", image_input=True), parts=())


FIRST_BLOCK = StepCache(mode="first_block", threshold=0.3)


def _ltx_reference(pipeline, cache_config) -> torch.Tensor:
    pipeline.transformer.enable_cache(cache_config)
    try:
        return pipeline(prompt="a cat on the moon", negative_prompt="", height=32, width=64, num_frames=9,
                        frame_rate=25, num_inference_steps=9, guidance_scale=3.0, output_type="latent",
                        generator=torch.Generator().manual_seed(3), max_sequence_length=16).frames
    finally:
        pipeline.transformer.disable_cache()


@pytest.mark.parametrize("mode", ["magcache", "first_block"])
def test_block_level_step_caches_match_diffusers_hooks_on_ltx_pipeline(mode):
    """LTX's packed forward runs the block-level caches: MagCache and FirstBlockCache (LTXPipeline batches both CFG
    rows, whose pooled distance is the engine's) equal the pipeline with diffusers' own hooks, and they skip."""
    (prompt,) = _prompts("a cat on the moon")
    ratios = (1.0, 1.02, 1.01, 0.99, 1.0, 1.03, 0.98, 1.01, 0.97)
    cache = FIRST_BLOCK if mode == "first_block" else StepCache(
        mode="magcache", threshold=0.06, max_skip_steps=2, retention_ratio=0.2, mag_ratios=ratios)
    engine = Engine([LTX])
    engine.admit("x", _spec(steps=9, seed=3, guidance=3.0, cache=cache), prompt)
    engine.run()
    assert engine.done["x"].computed_steps < 9
    pipeline = load_adapter(LTX, parts=("text", "transformer", "vae")).pipeline
    config = FirstBlockCacheConfig(threshold=0.3) if mode == "first_block" else MagCacheConfig(
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=9, mag_ratios=list(ratios))
    reference = _ltx_reference(pipeline, config)
    shape = engine.latents["x"].shape
    unpacked = pipeline._unpack_latents(reference, shape[2], shape[3], shape[4])
    torch.testing.assert_close(engine.latents["x"], unpacked, rtol=0, atol=1e-5)


def test_block_level_step_caches_packed_with_others_equal_alone():
    """A FirstBlockCache LTX request skipping beside a TeaCache one and an uncached one of another frame rate and
    shape ends as alone."""
    target_prompt, other_prompt, third = _prompts("a cat on the moon", "red car at night", "a dog")
    tea = StepCache(mode="teacache", threshold=0.3, warmup_steps=2, coefficients=(0.3, 0.0))
    assert_joined_late_equals_alone(LTX, (_spec(steps=8, seed=7, cache=FIRST_BLOCK), target_prompt),
                                    (_spec(12, steps=6, height=64, frames=17, seed=1), other_prompt),
                                    (_spec(steps=6, seed=2, cache=tea), third))


def test_block_level_step_caches_of_image_rows_packed_with_others_equal_alone():
    """Image-to-video rows (their clean first frame modulated at timestep 0, in the blocks and in a skipped step's
    head) under FirstBlockCache and TeaCache, packed with an uncached one of another shape, end as alone."""
    target_prompt, other_prompt, third = _prompts("a cat on the moon", "red car at night", "a dog")
    tea = StepCache(mode="teacache", threshold=0.3, warmup_steps=2, coefficients=(0.3, 0.0))
    target = _ispec(steps=8, seed=7, cache=FIRST_BLOCK)
    other, cached = _ispec(12, steps=6, height=64, frames=17, seed=1), _ispec(steps=6, seed=2, cache=tea)
    assert_joined_late_equals_alone(LTX_I2V, (target, _conditioned(target_prompt, noise_picture(2), target)),
                                    (other, _conditioned(other_prompt, noise_picture(3, 64, 64), other)),
                                    (cached, _conditioned(third, noise_picture(4), cached)))
    for spec, prompt in ((target, target_prompt), (cached, third)):
        engine = Engine([LTX_I2V])
        engine.admit("x", spec, _conditioned(prompt, noise_picture(5), spec))
        engine.run()
        assert engine.done["x"].computed_steps < spec.num_inference_steps
