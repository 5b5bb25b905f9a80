"""Per-request step caches inside step batching: the schedules, the plans that carry only computed rows, and the
engine's TaylorSeer and MagCache against diffusers' own hooks on the pipeline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.hooks.mag_cache import nearest_interp
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState
from pydantic import ValidationError

from deployments.text_encoder import EncodeRequest, TextEncoderCore
from engine.config import BudgetConfig
from engine.messages import StepResult
from engine.policies import make_policy
from engine.scheduler import StepSchedulerCore
from models import load_adapter
from models.step_cache import StepCache, computed_steps_left, interpolate_ratios
from tests.conftest import tiny_spec
from tests.factories import Engine, assert_joined_late_equals_alone, gen_spec, new_request
from tests.spmd_cases import assert_two_ranks_equal_one_rank

TAYLOR = StepCache(mode="taylorseer", interval=3, warmup_steps=2)


@pytest.mark.parametrize("interval,warmup", [(5, 3), (3, 2), (2, 1), (1, 3)])
def test_the_schedule_is_diffusers_taylorseer_rule(interval, warmup):
    """Which steps compute is decided by the rule of diffusers' own hook, step for step."""
    hook = TaylorSeerCacheHook(interval, warmup, torch.float32, StateManager(TaylorSeerState))
    hook.state_manager.set_context(CacheContext(name="request"))
    expected = [hook._measure_should_compute()[0] for _ in range(30)]
    cache = StepCache(mode="taylorseer", interval=interval, warmup_steps=warmup)
    assert list(cache.schedule(30)) == expected
    assert computed_steps_left(cache.schedule(30))[0] == sum(expected)
    assert all(StepCache().schedule(30))


def test_a_second_expert_computes_its_first_step():
    cache = StepCache(mode="taylorseer", interval=5, warmup_steps=2)
    assert not cache.schedule(10)[4] and cache.schedule(10, expert_switch_step=4)[4]


RATIOS = (1.0, 1.02, 1.01, 0.99, 1.0, 1.03, 0.98, 1.01, 0.97)
MAG = StepCache(mode="magcache", threshold=0.06, max_skip_steps=2, retention_ratio=0.2, mag_ratios=RATIOS)


def test_the_magcache_schedule_accumulates_the_ratios_error():
    """After the retained 20% (2 of 9 steps), steps skip while the accumulated |1 - product of ratios| stays within
    0.06 and at most 2 in a row; a longer or shorter run interpolates the ratios (diffusers' nearest_interp)."""
    assert MAG.schedule(9) == (True, True, False, False, True, False, False, True, False)
    assert MAG.model_copy(update={"threshold": 0.005}).schedule(9) == (True,) * 4 + (False,) + (True,) * 4
    assert len(MAG.schedule(30)) == 30 and sum(MAG.schedule(30)) < 30


@pytest.mark.parametrize("length", [1, 2, 5, 9, 13, 20, 28, 50, 61])
def test_ratios_interpolate_as_diffusers_does(length):
    """The scheduler's numpy interpolation of the ratios to a run's length picks diffusers' (torch) indices."""
    ratios = torch.linspace(0.7, 1.1, 20)
    expected = nearest_interp(ratios, length).numpy()
    assert np.array_equal(interpolate_ratios(ratios.numpy(), length), expected)


def test_options_of_another_mode_are_refused():
    with pytest.raises(ValidationError, match="taylorseer"):
        StepCache(mode="none", interval=3)
    with pytest.raises(ValidationError):
        StepCache(mode="taylorseer", interval=0)
    with pytest.raises(ValidationError, match="magcache"):
        StepCache(mode="taylorseer", threshold=0.1)
    with pytest.raises(ValidationError, match=r"\(0, 100\)"):
        StepCache(mode="magcache", mag_ratios=(1.0, -1.0))


def test_cached_steps_carry_no_rows_tokens_or_ring():
    """A cached step holds no forward row, no token of the step's budget and no Brick assignment; the request's
    counters and SRPTF's remaining cost count only the steps that compute."""
    core = StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=4), batching="fill")
    cached = new_request(steps=10, seq_len=100, request_id="cached")
    core.admit(replace(cached, cache=TAYLOR))
    core.admit(new_request(steps=10, seq_len=100, request_id="plain"))
    meta = core.pool["cached"]
    computes = list(TAYLOR.schedule(10))
    assert meta.remaining_cost == sum(computes) * 100 < core.pool["plain"].remaining_cost
    rows_seen = []
    while core.pool:
        plan = core.schedule()
        steps = {s.request_id: s for s in plan.scheduled}
        if "cached" in steps:
            rows_seen.append(steps["cached"].rows)
            plain_rows = 2 if "plain" in steps else 0
            assert plan.num_tokens == 100 * (steps["cached"].rows + plain_rows)
            assert len(plan.rings["cog"].assignments) == steps["cached"].rows + plain_rows
        core.postprocess(plan, StepResult.all_stepped(plan))
        ended = {m.request_id: m for m in core.pop_done()}
        if "cached" in ended:
            assert ended["cached"].computed_steps == sum(computes)
    assert rows_seen == [2 if c else 0 for c in computes]


@pytest.fixture(scope="module")
def wan():
    spec = tiny_spec("wan")
    prompts = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                                    EncodeRequest(spec.name, "red car at night", "blur")])
    return spec, prompts


def test_taylorseer_equals_diffusers_lite_hooks_on_the_pipeline(wan):
    """The engine's TaylorSeer (one state per request, cached steps out of the forward) gives the latents of
    WanPipeline with diffusers' TaylorSeer lite hooks (blocks skipped, proj_out extrapolated) on each CFG branch."""
    spec, prompts = wan
    engine = Engine([spec])
    engine.admit("x", gen_spec(spec.name, steps=9, seed=3, guidance=6.0, prompt="a cat on the moon", cache=TAYLOR),
                 prompts[0])
    engine.run()
    forwards = sum(r.forwards for r in engine.results)
    assert forwards == sum(TAYLOR.schedule(9)) == engine.done["x"].computed_steps < 9

    assert_equals_the_cached_pipeline(spec, engine.latents["x"], TaylorSeerCacheConfig(
        cache_interval=3, disable_cache_before_step=2, taylor_factors_dtype=torch.float32, use_lite_mode=True))


def assert_equals_the_cached_pipeline(spec, latents: torch.Tensor, config, guidance: float = 6.0) -> None:
    """`latents` (the engine's, of "a cat on the moon", seed 3, 9 steps, 32x48x9) equal those of the family's
    pipeline with diffusers' cache hooks `config` within 1e-5, and the cache changed them (uncached differs)."""
    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    kwargs = dict(prompt="a cat on the moon", negative_prompt="" if guidance > 1 else None, height=32, width=48,
                  num_frames=9, num_inference_steps=9, guidance_scale=guidance, output_type="latent",
                  max_sequence_length=16)
    pipeline.transformer.enable_cache(config)
    reference = pipeline(generator=torch.Generator().manual_seed(3), **kwargs).frames
    pipeline.transformer.disable_cache()
    uncached = pipeline(generator=torch.Generator().manual_seed(3), **kwargs).frames
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-5)
    assert (latents - uncached).abs().max() > 1e-3  # the cache did change the result


def test_a_cached_request_packed_with_others_equals_alone(wan):
    """Cache decisions are the request's own: batching with an uncached request of another shape changes nothing."""
    spec, prompts = wan
    assert_joined_late_equals_alone(
        spec, (gen_spec(spec.name, steps=8, seed=5, cache=TAYLOR), prompts[0]),
        (gen_spec(spec.name, steps=10, height=48, width=32, frames=5, seed=1), prompts[1]))


def test_interval_one_computes_every_step_and_changes_no_byte(wan):
    """The cache's bookkeeping alone (interval 1: every step computes) leaves the latents as mode none makes them."""
    spec, prompts = wan
    latents = []
    for cache in (StepCache(), StepCache(mode="taylorseer", interval=1)):
        engine = Engine([spec])
        engine.admit("x", gen_spec(spec.name, steps=6, seed=2, cache=cache), prompts[0])
        engine.run()
        latents.append(engine.latents["x"])
    assert torch.equal(latents[0], latents[1])



@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_magcache_equals_diffusers_mag_cache_hooks_on_the_pipeline(family):
    """The engine's MagCache (skipped steps: embeddings and head of the request's rows, out of the packed forward,
    each CFG row adding its own last blocks' residual) gives the latents of the family's pipeline with diffusers'
    MagCache hooks (WanPipeline: one state per cond / uncond context; CogVideoXPipeline: both rows in one batch)."""
    spec = tiny_spec(family)
    prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", "")])[0]
    engine = Engine([spec])
    engine.admit("x", gen_spec(spec.name, steps=9, seed=3, guidance=6.0, prompt="a cat on the moon", cache=MAG),
                 prompt)
    engine.run()
    assert sum(r.forwards for r in engine.results) == sum(MAG.schedule(9)) == engine.done["x"].computed_steps == 4

    assert_equals_the_cached_pipeline(spec, engine.latents["x"], MagCacheConfig(
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=9, mag_ratios=list(RATIOS)))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_a_magcache_request_packed_with_others_equals_alone(family):
    """Its residuals are the request's own rows': packing it with a request of another shape changes nothing."""
    spec = tiny_spec(family)
    prompts = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                                    EncodeRequest(spec.name, "red car at night", "blur")])
    assert_joined_late_equals_alone(
        spec, (gen_spec(spec.name, steps=9, seed=5, cache=MAG), prompts[0]),
        (gen_spec(spec.name, steps=10, height=48, width=32, frames=5, seed=1), prompts[1]))


def test_block_caches_on_two_ranks_equal_one_rank():
    """On a Brick ring of 2 the kept residuals are gathered with the outputs, so each rank holds them whole, a
    FirstBlockCache request's distance is summed over each rank's shard and all-reduced, and TeaCache's decision is
    the same replicated computation on each rank, so the ranks decide alike: MagCache, FirstBlockCache and TeaCache
    requests (beside a TaylorSeer and an uncached one) end as on one rank."""
    spec = tiny_spec("wan")
    asks = [("mag", gen_spec(spec.name, steps=9, height=64, width=96, seed=1, cache=MAG)),
            ("first", gen_spec(spec.name, steps=9, height=64, width=96, seed=4, cache=_first_block(0.1))),
            ("tea", gen_spec(spec.name, steps=9, height=64, width=96, seed=5, cache=_teacache(0.3))),
            ("taylor", gen_spec(spec.name, steps=8, seed=2, cache=TAYLOR)),
            ("plain", gen_spec(spec.name, steps=4, seed=3))]
    ranks = assert_two_ranks_equal_one_rank([spec], asks, 8)
    assert all(0 < r["computed_steps"][request] < 9 for r in ranks for request in ("first", "tea"))


def test_a_step_cache_fault_fails_only_its_request(wan):
    """A MagCache request whose residuals are lost on the runner fails at its first skipped step, naming the step
    cache; the uncached request packed beside it finishes."""
    spec, prompts = wan
    engine = Engine([spec])
    engine.admit("mag", gen_spec(spec.name, steps=9, seed=1, cache=MAG), prompts[0])
    engine.admit("plain", gen_spec(spec.name, steps=9, seed=2), prompts[1])
    while engine.core.pool["mag"].steps_done < 2:  # steps 0 and 1 computed
        engine.step()
    engine.runner.requests["mag"].cache.rows = None
    engine.run()
    assert engine.done["mag"].error.startswith("step cache failed: step 2 skips the blocks")
    assert engine.done["plain"].error is None and "plain" in engine.latents and "mag" not in engine.latents


def _first_block(threshold: float) -> StepCache:
    return StepCache(mode="first_block", threshold=threshold)


@pytest.mark.parametrize("family,guidance,threshold,computed", [("wan", 1.0, 0.1, 4), ("cogvideox", 6.0, 0.4, 3)])
def test_first_block_equals_diffusers_first_block_cache_on_the_pipeline(family, guidance, threshold, computed):
    """The engine's FirstBlockCache (decided inside the packed step from the request's own rows: the first block
    for every row, the other blocks only for the rows whose first-block residual moved more than the threshold)
    gives the latents of the family's pipeline with diffusers' FirstBlockCache hooks. WanPipeline keeps one state
    per cond / uncond context, so it is compared without CFG; CogVideoXPipeline runs both CFG rows in one batch,
    whose pooled distance is the engine's (its CFG rows decide together)."""
    spec = tiny_spec(family)
    negative = "" if guidance > 1 else None
    prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", negative)])[0]
    engine = Engine([spec])
    engine.admit("x", gen_spec(spec.name, steps=9, seed=3, guidance=guidance, prompt="a cat on the moon",
                               cache=_first_block(threshold)), prompt)
    engine.run()
    skipped = sum("x" in r.skipped_in_step for r in engine.results)
    assert engine.done["x"].computed_steps == 9 - skipped == computed

    assert_equals_the_cached_pipeline(spec, engine.latents["x"], FirstBlockCacheConfig(threshold=threshold), guidance)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_a_first_block_request_packed_with_others_equals_alone(family):
    """Its decisions are its own rows': packed with an uncached request of another shape and a MagCache one (so
    some rows of the step run every block while it skips), it ends as alone."""
    spec = tiny_spec(family)
    prompts = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                                    EncodeRequest(spec.name, "red car at night", "blur"),
                                                    EncodeRequest(spec.name, "a dog", "")])
    threshold = 0.1 if family == "wan" else 0.4
    assert_joined_late_equals_alone(
        spec, (gen_spec(spec.name, steps=9, seed=5, cache=_first_block(threshold)), prompts[0]),
        (gen_spec(spec.name, steps=10, height=48, width=32, frames=5, seed=1), prompts[1]),
        (gen_spec(spec.name, steps=7, seed=2, cache=MAG), prompts[2]))


def test_first_block_skips_count_as_cached_and_srptf_expects_the_observed_fraction():
    """The runner's skipped_in_step requests count no computed step; the request's remaining cost (SRPTF's key)
    follows its observed fraction of computed steps, and it stays in the run queue under its new key."""
    core = StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=4), batching="fill")
    core.admit(replace(new_request(steps=10, seq_len=100, request_id="first"), cache=_first_block(0.1)))
    core.admit(new_request(steps=10, seq_len=100, request_id="plain"))
    meta = core.pool["first"]
    assert meta.remaining_cost == core.pool["plain"].remaining_cost == 1000
    for step in range(4):
        plan = core.schedule()
        assert {s.request_id: s.rows for s in plan.scheduled} == {"first": 2, "plain": 2}  # the first block runs
        skipped = ("first",) if step % 2 else ()
        core.postprocess(plan, StepResult(step_id=plan.step_id, stepped=tuple(plan.request_ids),
                                          skipped_in_step=skipped))
    assert meta.computed_steps == 2 and meta.steps_done == 4
    assert meta.remaining_cost == 300 < core.pool["plain"].remaining_cost == 600
    assert next(core.queue.in_order(core.clock())) is meta


def test_the_drain_rate_counts_the_tokens_that_computed(wan):
    """Retry-After divides the pool's expected computed work by the drain rate, so the rate counts a step's tokens
    without those of a request whose cache skipped inside it."""
    spec, prompts = wan
    engine = Engine([spec])
    engine.admit("first", gen_spec(spec.name, steps=4, seed=1, cache=_first_block(0.1)), prompts[0])
    engine.admit("plain", gen_spec(spec.name, steps=4, height=48, width=32, seed=2), prompts[1])
    plan = engine.engine.schedule()
    engine.engine.observe(plan, 1.0, ("first",))
    first = next(s for s in plan.scheduled if s.request_id == "first")
    computed_tokens = plan.num_tokens - engine.core.pool["first"].seq_len * first.rows
    assert engine.engine.drain_rate.token_steps_per_s == computed_tokens < plan.num_tokens


def _teacache(threshold: float, coefficients: tuple[float, ...] = (1.0, 0.0)) -> StepCache:
    return StepCache(mode="teacache", threshold=threshold, warmup_steps=2, coefficients=coefficients)


class TeaCacheReference:
    """TeaCache4Wan2.1's rule on `WanPipeline`'s transformer with torch hooks, one state per CFG context (the
    pipeline calls cond then uncond each step): the decision from the call's time projection (`timestep_proj` of
    the condition embedder on the call's own text), a skipped call's blocks passing their input through and the
    last one adding the context's residual of its last computed call."""

    def __init__(self, transformer, threshold: float, warmup: int, coefficients: tuple[float, ...], contexts: int):
        self.transformer, self.threshold, self.warmup = transformer, threshold, warmup
        self.rescale, self.contexts, self.calls = np.poly1d(coefficients), contexts, 0
        self.state = [{"previous": None, "accumulated": 0.0, "residual": None} for _ in range(contexts)]
        self.computes, self.blocks_input = True, None
        blocks = transformer.blocks
        self.handles = [transformer.register_forward_pre_hook(self._decide, with_kwargs=True),
                        blocks[0].register_forward_pre_hook(self._enter)]
        self.handles += [block.register_forward_hook(self._leave if i == len(blocks) - 1 else self._pass)
                         for i, block in enumerate(blocks)]
        self.skipped_steps: list[int] = []

    def _decide(self, module, args, kwargs):
        context, step = self.calls % self.contexts, self.calls // self.contexts
        self.calls += 1
        state = self.state[context]
        _, modulation, _, _ = module.condition_embedder(kwargs["timestep"], kwargs["encoder_hidden_states"], None)
        self.computes = True
        if step >= self.warmup and state["previous"] is not None:
            then = state["previous"]
            state["accumulated"] += float(self.rescale(((modulation - then).abs().mean() / then.abs().mean()).item()))
            self.computes = state["accumulated"] >= self.threshold
        if self.computes:
            state["accumulated"] = 0.0
        elif context == 0:
            self.skipped_steps.append(step)
        state["previous"], self.context = modulation, context

    def _enter(self, module, args):
        self.blocks_input = args[0]

    def _pass(self, module, args, output):
        return output if self.computes else args[0]

    def _leave(self, module, args, output):
        state = self.state[self.context]
        if self.computes:
            state["residual"] = output - self.blocks_input
            return output
        return self.blocks_input + state["residual"]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_teacache_equals_the_teacache_rule_on_the_pipeline():
    """The engine's TeaCache (decided on the runner before the forward from the request's time projection, a
    skipped step on MagCache's path) gives the latents of WanPipeline under TeaCache4Wan2.1's rule, written
    independently on torch hooks over the pipeline's transformer."""
    spec = tiny_spec("wan")
    prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", "")])[0]
    cache = _teacache(0.3)
    engine = Engine([spec])
    engine.admit("x", gen_spec(spec.name, steps=9, seed=3, guidance=6.0, prompt="a cat on the moon", cache=cache),
                 prompt)
    engine.run()
    skipped = [i for i, r in enumerate(engine.results) if "x" in r.skipped_in_step]
    assert engine.done["x"].computed_steps == 9 - len(skipped) and 0 < len(skipped) < 7

    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    kwargs = dict(prompt="a cat on the moon", negative_prompt="", height=32, width=48, num_frames=9,
                  num_inference_steps=9, guidance_scale=6.0, output_type="latent", max_sequence_length=16)
    reference_hooks = TeaCacheReference(pipeline.transformer, 0.3, 2, (1.0, 0.0), contexts=2)
    reference = pipeline(generator=torch.Generator().manual_seed(3), **kwargs).frames
    reference_hooks.remove()
    uncached = pipeline(generator=torch.Generator().manual_seed(3), **kwargs).frames
    assert reference_hooks.skipped_steps == skipped
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)
    assert (engine.latents["x"] - uncached).abs().max() > 1e-3  # the cache did change the result


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_a_teacache_request_packed_with_others_equals_alone(family):
    """A TeaCache request skips by its own timesteps: packed with an uncached request of another shape and a
    FirstBlockCache one, it ends as alone, and it did skip."""
    spec = tiny_spec(family)
    prompts = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                                    EncodeRequest(spec.name, "red car at night", "blur"),
                                                    EncodeRequest(spec.name, "a dog", "")])
    coefficients = (1.0, 0.0) if family == "wan" else (0.3, 0.0)  # CogVideoX's time embedding moves more per step
    target = gen_spec(spec.name, steps=9, seed=5, cache=_teacache(0.3, coefficients))
    assert_joined_late_equals_alone(
        spec, (target, prompts[0]), (gen_spec(spec.name, steps=10, height=48, width=32, frames=5, seed=1), prompts[1]),
        (gen_spec(spec.name, steps=7, seed=2, cache=_first_block(0.1)), prompts[2]))
    engine = Engine([spec])
    engine.admit("t", target, prompts[0])
    engine.run()
    assert engine.done["t"].computed_steps < 9


def test_teacache_calibration_fits_the_rescaling_polynomial():
    """The calibration CLI's TeaCache fit: one (modulation change, output change) point per consecutive pair of
    steps of every run and CFG row, a degree-4 polynomial through them that fits better than their mean."""
    from api.cache_calibration import calibrate_teacache, teacache_points

    spec = tiny_spec("wan")
    x, y = teacache_points(spec, ["a cat", "a dog"], 6, 32, 48, 9, seeds=1)
    assert len(x) == len(y) == 2 * 2 * 5 and all(v > 0 for v in x + y)
    coefficients = calibrate_teacache(spec, ["a cat", "a dog"], 6, 32, 48, 9, seeds=1)
    assert len(coefficients) == 5 and all(np.isfinite(coefficients))
    fitted = np.poly1d(coefficients)(np.array(x))
    assert np.mean((fitted - y) ** 2) < np.var(y)
