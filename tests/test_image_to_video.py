"""Image-to-video in the packed engine (CogVideoX-5b-I2V, Wan2.2-I2V-A14B and Wan2.1-I2V layouts), against
diffusers' `CogVideoXImageToVideoPipeline` and `WanImageToVideoPipeline` (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.messages import NewRequest
from engine.request import RequestStatus
from models import load_adapter
from models.interface import EncodedPrompt
from models.spec import ModelSpec
from models.step_cache import StepCache
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec, noise_picture
from tests.spmd_cases import assert_two_ranks_equal_one_rank

I2V = tiny_spec("cogvideox", name="cogvideox-i2v-tiny", tiny_variant="i2v")
I2V15 = tiny_spec("cogvideox", name="cogvideox15-i2v-tiny", tiny_variant="cogvideox1.5-i2v")
WAN_I2V = tiny_spec("wan", name="wan2.2-i2v-tiny", tiny_variant="wan2.2-i2v-a14b")


def conditioned(prompt: EncodedPrompt, image: Image.Image, height: int, width: int, seed: int,
                frames: int = 9, spec: ModelSpec = I2V) -> EncodedPrompt:
    """The prompt with the image's latents, as the job's pipeline hands it to the scheduler."""
    return prompt.with_condition(load_adapter(spec, parts=("vae",)).encode_image(image, height, width, frames, seed))


def _prompts(*texts: str, spec: ModelSpec = I2V) -> list[EncodedPrompt]:
    return TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, t, "") for t in texts])


def test_an_image_to_video_checkpoint_halves_the_transformer_channels_for_its_noise():
    adapter = load_adapter(I2V, parts=())
    assert adapter.image_to_video and not load_adapter(tiny_spec("cogvideox"), parts=()).image_to_video
    assert adapter.latent_shape(32, 48, 9) == (3, 4, 4, 6)
    assert adapter.image_placeholder((3, 4, 4, 6))["image_latents"].shape == (1, 1, 4, 4, 6)


@pytest.mark.parametrize("model", [I2V, I2V15], ids=["cogvideox-5b-i2v", "cogvideox1.5-i2v"])
def test_engine_matches_the_image_to_video_pipeline(model):
    """CogVideoX1.5-5B-I2V's layout adds the `ofs` embedding and a leading padding frame (3 latent frames -> 4)."""
    (prompt,) = _prompts("a cat on the moon", spec=model)
    image, spec = noise_picture(0), gen_spec(model.name, steps=5, frames=9, seed=3, guidance=6.0)
    engine = Engine([model])
    engine.admit("x", spec, conditioned(prompt, image, spec.height, spec.width, spec.seed, spec=model))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    adapter = load_adapter(model, parts=("text", "transformer", "vae"))
    assert adapter.image_to_video and (adapter.pipeline.transformer.ofs_embedding is not None) == (model is I2V15)
    pipeline = CogVideoXImageToVideoPipeline(**adapter.pipeline.components)
    # The pipeline draws the image's posterior sample and then the noise from one generator; the engine draws them
    # in two processes from the same seed, so the reference gets the engine's noise and the seed for the image.
    noise = adapter.initial_latents(adapter.latent_shape(32, 48, 9), spec.seed, adapter.new_sampler(5, (1,)))
    reference = pipeline(image=image, prompt="a cat on the moon", negative_prompt="", height=32, width=48,
                         num_frames=9, num_inference_steps=5, guidance_scale=6.0, latents=noise,
                         generator=torch.Generator().manual_seed(3), output_type="latent",
                         max_sequence_length=16).frames
    assert reference.shape[1] == (4 if model is I2V15 else 3)
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    other = Engine([model])
    other.admit("y", spec, conditioned(prompt, noise_picture(1), spec.height, spec.width, spec.seed, spec=model))
    other.run()
    assert (other.latents["y"] - engine.latents["x"]).abs().max() > 1e-3  # the image conditions the video


@pytest.mark.parametrize("spec", [I2V, I2V15, WAN_I2V], ids=["cogvideox", "cogvideox1.5", "wan2.2"])
def test_packed_with_other_shapes_and_images_equals_alone(spec):
    target_prompt, other_prompt = _prompts("a cat on the moon", "red car at night", spec=spec)
    target = gen_spec(spec.name, steps=4, height=32, width=48, frames=9, seed=7)
    assert_joined_late_equals_alone(
        spec, (target, conditioned(target_prompt, noise_picture(2), 32, 48, 7, spec=spec)),
        (gen_spec(spec.name, steps=6, height=48, width=32, frames=17, seed=1),
         conditioned(other_prompt, noise_picture(3, 64, 64), 48, 32, 1, frames=17, spec=spec)))


def test_a_request_without_its_image_fails_at_admission_and_others_finish():
    prompt, other = _prompts("a cat", "a dog")
    engine = Engine([I2V])
    engine.admit("bare", gen_spec(I2V.name, steps=3), prompt)
    engine.admit("ok", gen_spec(I2V.name, steps=3), conditioned(other, noise_picture(4), 32, 48, 0))
    engine.run()
    assert engine.done["bare"].status is RequestStatus.FAILED and "image_latents" in engine.done["bare"].error
    assert engine.done["ok"].status is RequestStatus.FINISHED


def test_text_to_video_models_refuse_an_image():
    with pytest.raises(ValueError, match="not an image-to-video model"):
        load_adapter(tiny_spec("cogvideox"), parts=("vae",)).encode_image(noise_picture(0), 32, 48, 9, 0)


def test_checkpoint_round_trip_of_an_image_to_video_model(tmp_path):
    reference = load_adapter(I2V, parts=("text", "transformer", "vae"))
    CogVideoXImageToVideoPipeline(**reference.pipeline.components).save_pretrained(tmp_path)
    saved = I2V.model_copy(update={"source": str(tmp_path)})
    assert load_adapter(saved, parts=()).image_to_video
    image = noise_picture(5)
    cond = load_adapter(saved, parts=("vae",)).encode_image(image, 32, 48, 9, 0)
    torch.testing.assert_close(cond["image_latents"], reference.encode_image(image, 32, 48, 9, 0)["image_latents"])
    (prompt,) = _prompts("a cat")
    spec = gen_spec(I2V.name, steps=3)
    runs = []
    for source in (I2V, saved):
        engine = Engine([source])
        engine.admit("x", spec, prompt.with_condition(cond))
        engine.run()
        runs.append(engine.latents["x"])
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


def test_new_request_keeps_the_image_in_its_rows():
    (prompt,) = _prompts("a cat")
    spec = gen_spec(I2V.name)
    new = NewRequest.from_spec("x", spec, conditioned(prompt, noise_picture(0), 32, 48, 0), load_adapter(I2V, parts=()))
    assert all(row["image_latents"].shape == (1, 1, 4, 4, 6) for row in new.prompt.rows_in_order)
    assert new.row_tokens == (3 * 2 * 3 + 16,) * 2  # image channels add no tokens


def test_wan22_image_to_video_matches_its_pipeline_across_both_experts():
    """Wan2.2-I2V-A14B's layout: mask + [image, black frames] latents as extra channels, two experts by timestep."""
    from diffusers import WanImageToVideoPipeline

    adapter = load_adapter(WAN_I2V, parts=("text", "transformer", "vae"))
    assert adapter.image_to_video and adapter.expert_count == 2
    assert adapter.latent_shape(32, 48, 9) == (16, 3, 4, 6)
    (prompt,) = _prompts("a cat on the moon", spec=WAN_I2V)
    image, spec = noise_picture(0), gen_spec(WAN_I2V.name, steps=6, frames=9, seed=3, guidance=5.0, guidance_2=3.0)
    cond = adapter.encode_image(image, 32, 48, 9, spec.seed)
    assert cond["image_latents"].shape == (1, 20, 3, 4, 6)
    engine = Engine([WAN_I2V])
    engine.admit("x", spec, prompt.with_condition(cond))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    assert {r.forwards for r in engine.results} == {1}  # each step in one expert; the request switched once
    pipeline = WanImageToVideoPipeline(**adapter.pipeline.components, image_processor=None, image_encoder=None,
                                       boundary_ratio=adapter.pipeline.config.boundary_ratio)
    noise = adapter.initial_latents(adapter.latent_shape(32, 48, 9), spec.seed, adapter.new_sampler(6, (1,)))
    # The embeddings, not the text: WanImageToVideoPipeline's prompt cleaning needs ftfy, which WanPipeline's does not.
    reference = pipeline(image=image, prompt_embeds=prompt.cond["encoder_hidden_states"],
                         negative_prompt_embeds=prompt.uncond["encoder_hidden_states"], height=32, width=48,
                         num_frames=9, num_inference_steps=6, guidance_scale=5.0, guidance_scale_2=3.0, latents=noise,
                         output_type="latent").frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)


def test_image_to_video_rows_on_two_ranks_equal_one_rank():
    """Both layouts' image channels travel with their rows into Brick shards: a big request on a ring of 2 and a small
    one on one rank, two gloo ranks == one."""
    asks = [("cog-big", gen_spec(I2V.name, steps=3, height=64, width=96, frames=9, seed=1)),
            ("cog-small", gen_spec(I2V.name, steps=2, seed=2, guidance=1.0)),
            ("wan-big", gen_spec(WAN_I2V.name, steps=3, height=64, width=96, frames=9, seed=3, guidance_2=2.0))]
    assert_two_ranks_equal_one_rank([I2V, WAN_I2V], asks, 32)  # the big rows (72 video tokens) shard over 2 ranks


def test_wan21_image_to_video_attends_to_the_image_clip_tokens_as_its_pipeline_does():
    """Wan 2.1 I2V's layout: CLIP tokens of the image (encoded beside the VAE) in every block's cross-attention, with
    the condition latents as extra channels. diffusers' attention processor splits image from text tokens assuming
    512 text tokens, so this model's prompts are 512 tokens long."""
    spec = tiny_spec("wan", name="wan2.1-i2v-tiny", tiny_variant="wan2.1-i2v", max_sequence_length=512)
    adapter = load_adapter(spec, parts=("text", "transformer", "vae"))
    assert adapter.image_to_video and adapter.expert_count == 1
    (prompt,) = _prompts("a cat on the moon", spec=spec)
    image, request = noise_picture(0), gen_spec(spec.name, steps=4, frames=9, seed=3, guidance=5.0)
    cond = load_adapter(spec, parts=("vae",)).encode_image(image, 32, 48, 9, request.seed)
    assert cond["image_embeds"].shape == (1, 17, 32)  # (32 / 8)^2 patches + the class token
    engine = Engine([spec])
    engine.admit("x", request, prompt.with_condition(cond))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    noise = adapter.initial_latents(adapter.latent_shape(32, 48, 9), request.seed, adapter.new_sampler(4, (1,)))
    reference = adapter.pipeline(image=image, prompt_embeds=prompt.cond["encoder_hidden_states"],
                                 negative_prompt_embeds=prompt.uncond["encoder_hidden_states"], height=32, width=48,
                                 num_frames=9, num_inference_steps=4, guidance_scale=5.0, latents=noise,
                                 output_type="latent").frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    bare = Engine([spec])
    bare.admit("y", request, prompt.with_condition({"image_latents": cond["image_latents"]}))
    bare.run()
    assert "image_embeds" in bare.done["y"].error  # refused at admission, before any forward


def test_wan21_image_to_video_checkpoint_loads_its_image_encoder_with_the_vae(tmp_path):
    spec = tiny_spec("wan", name="wan2.1-i2v-tiny", tiny_variant="wan2.1-i2v")
    reference = load_adapter(spec, parts=("text", "transformer", "vae"))
    reference.pipeline.save_pretrained(tmp_path)
    saved = spec.model_copy(update={"source": str(tmp_path)})
    vae_part = load_adapter(saved, parts=("vae",))
    assert vae_part.pipeline.image_encoder is not None and vae_part.pipeline.transformer is None
    worker = load_adapter(saved, parts=("transformer",))
    assert worker.pipeline.image_encoder is None and worker.image_to_video
    image = noise_picture(6)
    loaded, expected = (a.encode_image(image, 32, 48, 9, 0) for a in (vae_part, reference))
    for key in ("image_latents", "image_embeds"):
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=1e-6)


TI2V_IMAGE = tiny_spec("wan", name="wan2.2-ti2v-i2v-tiny", tiny_variant="wan2.2-ti2v-5b", image_input=True)


def test_ti2v_5b_image_input_matches_its_pipeline_with_expanded_timesteps():
    """TI2V-5B's image-to-video (`WanImageToVideoPipeline`, `expand_timesteps`): the image's latents are the first
    latent frame of the model input and of the result, its tokens at timestep 0; one checkpoint serves both."""
    from diffusers import WanImageToVideoPipeline

    adapter = load_adapter(TI2V_IMAGE, parts=("text", "transformer", "vae"))
    assert adapter.image_to_video and adapter.image_first_frame
    assert not load_adapter(tiny_spec("wan", tiny_variant="wan2.2-ti2v-5b"), parts=()).image_to_video
    (prompt,) = _prompts("a cat on the moon", spec=TI2V_IMAGE)
    image, spec = noise_picture(0), gen_spec(TI2V_IMAGE.name, steps=5, height=32, width=64, frames=9, seed=3)
    cond = adapter.encode_image(image, 32, 64, 9, spec.seed)
    assert cond["image_latents"].shape == (1, 48, 1, 2, 4)
    engine = Engine([TI2V_IMAGE])
    engine.admit("x", spec, prompt.with_condition(cond))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    pipeline = WanImageToVideoPipeline(**adapter.pipeline.components, image_processor=None, image_encoder=None,
                                       expand_timesteps=True)
    noise = adapter.initial_latents(adapter.latent_shape(32, 64, 9), spec.seed, adapter.new_sampler(5, (1,)))
    reference = pipeline(image=image, prompt_embeds=prompt.cond["encoder_hidden_states"],
                         negative_prompt_embeds=prompt.uncond["encoder_hidden_states"], height=32, width=64,
                         num_frames=9, num_inference_steps=5, guidance_scale=6.0, latents=noise,
                         output_type="latent").frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    assert torch.equal(engine.latents["x"][:, :, :1], cond["image_latents"])
    text_only = Engine([tiny_spec("wan", name=TI2V_IMAGE.name, tiny_variant="wan2.2-ti2v-5b")])
    text_only.admit("y", spec, prompt)
    text_only.run()
    assert (text_only.latents["y"] - engine.latents["x"])[:, :, 1:].abs().max() > 1e-3  # the image conditions it


def test_ti2v_5b_image_rows_packed_with_others_and_on_two_ranks_equal_alone():
    target_prompt, other_prompt = _prompts("a cat on the moon", "red car at night", spec=TI2V_IMAGE)
    target = gen_spec(TI2V_IMAGE.name, steps=4, height=32, width=64, frames=9, seed=7)
    other = gen_spec(TI2V_IMAGE.name, steps=6, height=64, width=32, frames=17, seed=1)
    assert_joined_late_equals_alone(
        TI2V_IMAGE, (target, conditioned(target_prompt, noise_picture(2), 32, 64, 7, spec=TI2V_IMAGE)),
        (other, conditioned(other_prompt, noise_picture(3, 64, 64), 64, 32, 1, frames=17, spec=TI2V_IMAGE)))
    asks = [("big", gen_spec(TI2V_IMAGE.name, steps=3, height=128, width=192, frames=9, seed=1)),
            ("small", gen_spec(TI2V_IMAGE.name, steps=2, height=32, width=64, seed=2, guidance=1.0))]
    assert_two_ranks_equal_one_rank([TI2V_IMAGE], asks, 32)  # the big row (72 tokens, 24 clean) on a ring of 2


def test_per_row_gives_the_clean_tokens_their_own_value_across_shards():
    """A request's first clean tokens may end inside its second shard: each shard takes the value its tokens need."""
    from attention.context import Segment, per_row

    segments = [Segment(0, 0, 3, 0), Segment(1, 0, 2, 3), Segment(0, 3, 4, 5)]
    noisy, clean = {0: torch.tensor([1.0]), 1: torch.tensor([2.0])}, {0: (5, torch.tensor([9.0]))}
    assert per_row(noisy, segments, clean)[:, 0].tolist() == [9, 9, 9, 2, 2, 9, 9, 1, 1]


WAN21_I2V = tiny_spec("wan", name="wan2.1-i2v-tiny", tiny_variant="wan2.1-i2v")


@pytest.mark.parametrize("spec", [I2V, I2V15, WAN21_I2V, TI2V_IMAGE],
                         ids=["cogvideox", "cogvideox1.5", "wan2.1-i2v", "wan2.2-ti2v-5b"])
def test_block_level_step_caches_of_image_rows_packed_with_others_equal_alone(spec):
    """The image-to-video layouts under the block-level caches: a FirstBlockCache request skipping its other
    blocks while a TeaCache request and an uncached one of another shape compute beside it (Wan 2.1 I2V's image
    tokens, TI2V-5B's clean first frame and CogVideoX 1.5's ofs embedding taken out of the blocks with its rows)
    ends as alone, and both cached requests do skip."""
    first = StepCache(mode="first_block", threshold=0.5)
    tea = StepCache(mode="teacache", threshold=0.3, warmup_steps=2, coefficients=(0.3, 0.0))
    prompts = _prompts("a cat on the moon", "red car at night", "a dog", spec=spec)
    target = (gen_spec(spec.name, steps=8, height=32, width=64, frames=9, seed=7, cache=first),
              conditioned(prompts[0], noise_picture(2), 32, 64, 7, spec=spec))
    cached = (gen_spec(spec.name, steps=6, height=32, width=64, frames=9, seed=2, cache=tea),
              conditioned(prompts[2], noise_picture(5), 32, 64, 2, spec=spec))
    plain = (gen_spec(spec.name, steps=6, height=64, width=32, frames=17, seed=1),
             conditioned(prompts[1], noise_picture(3, 64, 64), 64, 32, 1, frames=17, spec=spec))
    assert_joined_late_equals_alone(spec, target, cached, plain)
    for ask in (target, cached):
        engine = Engine([spec])
        engine.admit("x", *ask)
        engine.run()
        assert engine.done["x"].computed_steps < ask[0].num_inference_steps
