"""Wan 2.2 in the packed engine: the A14B two-expert layout and TI2V-5B's expanded timesteps and 4x16x16 VAE,
against diffusers' own `WanPipeline` loop on tiny random configs (fp32)."""

from __future__ import annotations

import pytest
import torch

from api.schemas import VideoGenerationRequest
from api.validation import InvalidRequest, RequestValidator, ServedModel
from attention.planner import BrickCostModel
from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.request import RequestStatus
from engine.step_cost import plan_work
from models import load_adapter
from tests.conftest import tiny_spec
from tests.factories import Engine, gen_spec
from tests.spmd_cases import assert_two_ranks_equal_one_rank

A14B = tiny_spec("wan", name="wan22-a14b-tiny", tiny_variant="wan2.2-a14b", default_guidance_scale=6.0,
                 default_guidance_scale_2=3.0)
TI2V = tiny_spec("wan", name="wan22-ti2v-tiny", tiny_variant="wan2.2-ti2v-5b")


def _prompt(spec, text: str = "a cat on the moon"):
    return TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, text, "")])[0]


def _pipeline_latents(spec, steps: int, guidance: float, guidance_2: float | None = None, height: int = 32,
                      width: int = 48) -> torch.Tensor:
    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    extra = {} if guidance_2 is None else {"guidance_scale_2": guidance_2}
    return pipeline(prompt="a cat on the moon", negative_prompt="", height=height, width=width, num_frames=9,
                    num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                    output_type="latent", max_sequence_length=16, **extra).frames


def test_two_experts_split_the_steps_by_timestep_as_wan_pipeline_does():
    adapter = load_adapter(A14B, parts=("transformer",))
    assert adapter.expert_count == 2 and adapter.pipeline.transformer_2 is not None
    timesteps = adapter.new_sampler(8, adapter.latent_shape(32, 48, 9)).timesteps
    switch = adapter.expert_switch_step(8, adapter.latent_shape(32, 48, 9))
    assert 0 < switch < 8  # both experts take part in an 8-step request
    assert [adapter.expert_index(t) for t in timesteps] == [0] * switch + [1] * (8 - switch)
    assert all(float(t) >= 875 for t in timesteps[:switch]) and all(float(t) < 875 for t in timesteps[switch:])
    one = load_adapter(tiny_spec("wan"), parts=())
    assert one.expert_count == 1 and one.expert_switch_step(8, (16, 3, 4, 6)) is None


def test_a14b_engine_matches_wan_pipeline_with_both_guidance_scales():
    engine = Engine([A14B])
    engine.admit("x", gen_spec(A14B.name, steps=8, seed=3, guidance=6.0, guidance_2=3.0), _prompt(A14B))
    engine.run()
    assert engine.done["x"].status is RequestStatus.FINISHED
    reference = _pipeline_latents(A14B, 8, 6.0, 3.0)
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    # The second guidance scale matters: the same request with one scale is another video.
    assert (engine.latents["x"] - _pipeline_latents(A14B, 8, 6.0, 6.0)).abs().max() > 1e-3


def test_rows_of_both_experts_in_one_step_run_one_forward_each_and_equal_alone():
    prompt = _prompt(A14B)
    target = gen_spec(A14B.name, steps=8, seed=3, guidance=6.0, guidance_2=3.0)
    alone = Engine([A14B])
    alone.admit("t", target, prompt)
    alone.run()

    mixed = Engine([A14B])
    mixed.admit("early", gen_spec(A14B.name, steps=8, height=64, seed=1, guidance=5.0, guidance_2=2.0), prompt)
    for _ in range(mixed.core.pool["early"].expert_switch_step):
        mixed.step()  # "early" reaches its low-noise steps
    mixed.admit("t", target, prompt)  # starts at high noise: the next steps hold rows of both experts
    plan = mixed.core.schedule()
    assert {s.request_id: s.expert for s in plan.scheduled} == {"early": 1, "t": 0}
    result = mixed.runner.execute(plan)
    mixed.core.postprocess(plan, result)
    mixed.latents.update(result.finished)
    assert result.forwards == 2 and set(result.stepped) == {"early", "t"}
    mixed.run()
    torch.testing.assert_close(mixed.latents["t"], alone.latents["t"], rtol=0, atol=1e-5)


def test_the_cost_model_prices_each_experts_forward_apart():
    engine = Engine([A14B])
    prompt = _prompt(A14B)
    engine.admit("early", gen_spec(A14B.name, steps=8, seed=1), prompt)
    for _ in range(engine.core.pool["early"].expert_switch_step):
        engine.step()
    engine.admit("late", gen_spec(A14B.name, steps=8, seed=2), prompt)
    plan = engine.core.schedule()
    work = plan_work(plan, BrickCostModel())
    assert set(work) == {A14B.name, f"{A14B.name}#1"}
    assert work[A14B.name] == pytest.approx(work[f"{A14B.name}#1"])  # same shape, one request each


def test_ti2v_5b_layout_matches_wan_pipeline_and_decodes_at_16x():
    adapter = load_adapter(TI2V, parts=("vae",))
    assert adapter.geometry.spatial_factor == 16 and adapter.geometry.pixel_multiple == 32
    assert adapter.latent_shape(32, 64, 9) == (48, 3, 2, 4)
    assert adapter.pipeline.config.expand_timesteps
    engine = Engine([TI2V])
    engine.admit("x", gen_spec(TI2V.name, steps=5, seed=3, height=32, width=64), _prompt(TI2V))
    engine.run()
    reference = _pipeline_latents(TI2V, 5, 6.0, height=32, width=64)
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    frames = adapter.decode(engine.latents["x"])
    assert frames.shape == (1, 9, 32, 64, 3) and frames.dtype.name == "uint8"


def test_both_experts_load_from_a_saved_checkpoint(tmp_path):
    load_adapter(A14B, parts=("text", "transformer", "vae")).pipeline.save_pretrained(tmp_path)
    saved = A14B.model_copy(update={"source": str(tmp_path)})
    assert load_adapter(saved, parts=()).expert_count == 2  # known from model_index.json, no weights
    worker = load_adapter(saved, parts=("transformer",))
    assert worker.pipeline.transformer_2 is not None and worker.pipeline.vae is None
    reference = load_adapter(A14B, parts=("transformer",))
    shape = reference.latent_shape(32, 48, 9)
    sampler = reference.new_sampler(8, shape)
    x = reference.initial_latents(shape, seed=0, sampler=sampler)
    prompt = _prompt(A14B)
    low_noise = sampler.timesteps[-1]
    assert worker.expert_index(low_noise) == 1
    expected = reference.forward_packed([x[0]], [low_noise], [prompt.cond])[0]
    torch.testing.assert_close(worker.forward_packed([x[0]], [low_noise], [prompt.cond])[0], expected,
                               rtol=0, atol=1e-6)


def test_guidance_scale_2_is_validated_per_model():
    served = {s.name: ServedModel.of(load_adapter(s, parts=())) for s in (A14B, tiny_spec("wan"))}
    validator = RequestValidator(served, 1000)
    spec = validator.video(VideoGenerationRequest(model=A14B.name, prompt="a cat", resolution="240p"))
    assert (spec.guidance_scale, spec.guidance_scale_2) == (6.0, 3.0)
    spec = validator.video(VideoGenerationRequest(model=A14B.name, prompt="a cat", resolution="240p",
                                                  guidance_scale=1.0, guidance_scale_2=4.0))
    assert spec.guidance_scale_2 == 4.0 and spec.negative_prompt is not None  # CFG on: one expert guides
    with pytest.raises(InvalidRequest) as refused:
        validator.video(VideoGenerationRequest(model="wan-tiny", prompt="a cat", resolution="240p",
                                               guidance_scale_2=2.0))
    assert refused.value.param == "guidance_scale_2" and "wan-tiny has one expert" in refused.value.message
    with pytest.raises(ValueError, match="tiny_variant 'wan2.3' is not a wan layout"):
        load_adapter(tiny_spec("wan", tiny_variant="wan2.3"), parts=())


def test_two_expert_steps_on_two_ranks_equal_one_rank():
    """Brick rings over a step whose rows belong to both experts: each expert's forward runs on its share of the
    plan, every rank entering the same collectives, and the videos equal one rank's."""
    asks = [("short", gen_spec(A14B.name, steps=2, height=64, width=112, seed=1, guidance=6.0, guidance_2=3.0)),
            ("long", gen_spec(A14B.name, steps=8, height=96, width=160, frames=17, seed=2, guidance=6.0,
                              guidance_2=3.0))]
    ranks = assert_two_ranks_equal_one_rank([A14B], asks, 64)
    assert all(2 in r["forwards"] for r in ranks)  # a step ran both experts' forwards
