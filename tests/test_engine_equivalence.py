"""Batched equals unbatched, and the engine equals diffusers' own pipeline, on tiny real models."""

from __future__ import annotations

import pytest
import torch

from deployments.dit_worker import DiTWorkerCore
from deployments.policies import make_policy
from deployments.request import RequestStatus
from deployments.step_scheduler import StepSchedulerCore
from deployments.text_encoder import EncodeRequest, TextEncoderCore
from deployments.vae_decoder import DecodeRequest, VaeDecoderCore
from deployments.models import load_adapter
from serve_graph.config import BudgetConfig
from tests.conftest import tiny_spec
from tests.factories import gen_spec

FAMILIES = ["cogvideox", "mochi", "wan", "sd3"]


def _engine(spec, max_batch_size=8):
    adapters = {spec.name: load_adapter(spec, parts=())}
    core = StepSchedulerCore(adapters, make_policy("fifo"), BudgetConfig(max_batch_size=max_batch_size))
    return core, DiTWorkerCore([spec]), TextEncoderCore([spec])


def _run_to_completion(core, worker) -> dict:
    while core.pool:
        core.step(worker.execute)
    return {r.request_id: r for r in core.pop_done()}


def _frames(family: str, n: int) -> int:
    return 1 if family == "sd3" else (n - 1) // 6 * 6 + 1 if family == "mochi" else n


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_unbatched(family):
    spec = tiny_spec(family)
    core, worker, encoder = _engine(spec)
    prompts = encoder.encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                    EncodeRequest(spec.name, "red car at night", None),
                                    EncodeRequest(spec.name, "a bird over the ocean", "blur")])
    target = gen_spec(spec.name, steps=6, height=32, width=48, frames=_frames(family, 9), seed=7, request_id="t")
    alone = _run_to_completion_single(core, worker, target, prompts[0])

    core, worker, _ = _engine(spec)
    core.admit(gen_spec(spec.name, steps=9, height=64, width=48, frames=_frames(family, 17), seed=1), prompts[1])
    core.admit(gen_spec(spec.name, steps=6, height=32, width=48, frames=_frames(family, 9), seed=2), prompts[2])
    core.step(worker.execute)
    core.step(worker.execute)  # the target joins two steps late: its timesteps differ from its batch mates'
    core.admit(target, prompts[0])
    plan_sizes = []
    while core.pool:
        plan_sizes.append(len(core.step(worker.execute).request_ids))
    batched = next(r for r in core.pop_done() if r.request_id == "t")
    assert max(plan_sizes) == 3
    assert batched.status is RequestStatus.FINISHED
    torch.testing.assert_close(batched.latents, alone.latents, rtol=0, atol=1e-5)


def _run_to_completion_single(core, worker, spec, prompt):
    core.admit(spec, prompt)
    return _run_to_completion(core, worker)[spec.request_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_diffusers_pipeline(family):
    """One request through encoder -> scheduler -> worker equals the diffusers pipeline's own loop."""
    spec = tiny_spec(family)
    core, worker, encoder = _engine(spec)
    prompt = encoder.encode_batch([EncodeRequest(spec.name, "a cat on the moon", "")])[0]
    frames = _frames(family, 9)
    result = _run_to_completion_single(core, worker, gen_spec(spec.name, steps=5, frames=frames, seed=3,
                                                              guidance=6.0, request_id="x"), prompt)
    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    kwargs = dict(prompt="a cat on the moon", negative_prompt="", height=32, width=48, num_inference_steps=5,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="latent",
                  max_sequence_length=16)
    if family != "sd3":
        kwargs["num_frames"] = frames
    out = pipeline(**kwargs)
    reference = out.images if family == "sd3" else out.frames
    torch.testing.assert_close(result.latents, reference, rtol=0, atol=1e-5)


def test_failing_request_fails_alone():
    spec = tiny_spec("cogvideox")
    core, worker, encoder = _engine(spec)
    good, bad = encoder.encode_batch([EncodeRequest(spec.name, "a cat", ""), EncodeRequest(spec.name, "a dog", "")])
    bad.cond["encoder_hidden_states"] = torch.zeros(1, 16, 7)  # wrong width: its forward raises
    core.admit(gen_spec(spec.name, steps=3, request_id="good"), good)
    core.admit(gen_spec(spec.name, steps=3, request_id="bad"), bad)
    done = _run_to_completion(core, worker)
    assert done["good"].status is RequestStatus.FINISHED and done["good"].steps_done == 3
    assert done["bad"].status is RequestStatus.FAILED and "transformer forward failed" in done["bad"].error


def test_vae_batched_decode_equals_alone():
    spec = tiny_spec("cogvideox")
    vae = VaeDecoderCore([spec])
    latents = [torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batched = vae.decode_batch([DecodeRequest(spec.name, x, "mp4", 8) for x in latents])
    alone = [vae.decode_batch([DecodeRequest(spec.name, x, "mp4", 8)])[0] for x in latents]
    assert batched == alone and len(set(batched)) == 3
