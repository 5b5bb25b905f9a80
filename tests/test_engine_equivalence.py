"""Packed equals alone, and the engine equals diffusers' own pipeline, on tiny real models of all four families."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from deployments.store.blobs import BlobStore
from deployments.text_encoder import EncodeRequest, TextEncoderCore
from deployments.vae_decoder import DecodeQueue, DecodeRequest, VaeDecoderCore
from engine.messages import NewRequest
from engine.request import RequestStatus
from models import load_adapter
from tests.conftest import tiny_spec
from tests.factories import Engine, gen_spec

FAMILIES = ["cogvideox", "mochi", "wan", "sd3"]


def _frames(family: str, n: int) -> int:
    return 1 if family == "sd3" else (n - 1) // 6 * 6 + 1 if family == "mochi" else n


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_with_other_shapes_equals_alone(family):
    """A request packed with others of other resolutions, frame counts, prompts and timesteps equals itself alone."""
    spec = tiny_spec(family)
    encoder = TextEncoderCore([spec])
    prompts = encoder.encode_batch([EncodeRequest(spec.name, "a cat on the moon", ""),
                                    EncodeRequest(spec.name, "red car at night", None),
                                    EncodeRequest(spec.name, "a bird flying over the dark ocean at sunset", "blur")])
    target = gen_spec(spec.name, steps=6, height=32, width=48, frames=_frames(family, 9), seed=7)
    alone = Engine([spec])
    alone.admit("t", target, prompts[0])
    alone.run()

    batched = Engine([spec])
    batched.admit("a", gen_spec(spec.name, steps=9, height=64, width=48, frames=_frames(family, 17), seed=1,
                                guidance=1.0), prompts[1])
    batched.admit("b", gen_spec(spec.name, steps=6, height=48, width=32, frames=_frames(family, 5), seed=2), prompts[2])
    batched.step()
    batched.step()  # the target joins two steps late: its timesteps differ from its batch mates'
    batched.admit("t", target, prompts[0])
    batched.run()
    assert batched.done["t"].status is RequestStatus.FINISHED
    mixed = [r for r in batched.results if len(r.stepped) == 3]
    assert mixed and all(r.forwards == 1 and r.shapes == 3 for r in mixed)  # three shapes, one forward
    torch.testing.assert_close(batched.latents["t"], alone.latents["t"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_diffusers_pipeline(family):
    """One request through encoder -> scheduler -> runner equals the diffusers pipeline's own loop."""
    spec = tiny_spec(family)
    prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat on the moon", "")])[0]
    frames = _frames(family, 9)
    engine = Engine([spec])
    engine.admit("x", gen_spec(spec.name, steps=5, frames=frames, seed=3, guidance=6.0), prompt)
    engine.run()
    pipeline = load_adapter(spec, parts=("text", "transformer", "vae")).pipeline
    kwargs = dict(prompt="a cat on the moon", negative_prompt="", height=32, width=48, num_inference_steps=5,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="latent",
                  max_sequence_length=16)
    if family != "sd3":
        kwargs["num_frames"] = frames
    out = pipeline(**kwargs)
    reference = out.images if family == "sd3" else out.frames
    torch.testing.assert_close(engine.latents["x"], reference, rtol=0, atol=1e-5)


def test_two_models_one_forward_each():
    specs = [tiny_spec("cogvideox"), tiny_spec("wan")]
    engine = Engine(specs)
    for spec in specs:
        prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat", "")])[0]
        for i, height in enumerate((32, 64)):
            engine.admit(f"{spec.name}-{i}", gen_spec(spec.name, steps=2, height=height, seed=i), prompt)
    engine.run()
    assert [(r.forwards, r.shapes, len(r.stepped)) for r in engine.results] == [(2, 4, 4)] * 2
    assert set(engine.latents) == {"cogvideox-tiny-0", "cogvideox-tiny-1", "wan-tiny-0", "wan-tiny-1"}


def test_failing_requests_fail_alone():
    """Bad embeddings are refused at admission; a forward that raises is retried request by request."""
    spec = tiny_spec("cogvideox")
    engine = Engine([spec])
    good, bad, odd = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, p, "") for p in "abc"])
    bad.cond["encoder_hidden_states"] = torch.zeros(1, 16, 7)  # the transformer takes width 32
    engine.admit("good", gen_spec(spec.name, steps=3), good)
    engine.admit("bad", gen_spec(spec.name, steps=3), bad)
    new = NewRequest.from_spec("odd", gen_spec(spec.name, steps=3), odd, engine.adapters[spec.name])
    engine.engine.admit(replace(new, latent_shape=(3, 5, 4, 6)))  # 5 channels: the patch embedding takes 4
    engine.run()
    assert engine.done["good"].status is RequestStatus.FINISHED and engine.done["good"].steps_done == 3
    refused, broken = engine.done["bad"], engine.done["odd"]
    assert refused.status is RequestStatus.FAILED and "width 7, the transformer takes 32" in refused.error
    assert broken.status is RequestStatus.FAILED and "transformer forward failed" in broken.error
    assert engine.results[0].forwards == 1 + 2  # the packed forward, then each request alone
    assert not engine.runner.requests  # state freed on the worker


def test_state_stays_on_the_runner_and_plans_carry_ids_only():
    spec = tiny_spec("cogvideox")
    engine = Engine([spec])
    prompt = TextEncoderCore([spec]).encode_batch([EncodeRequest(spec.name, "a cat", "")])[0]
    engine.admit("a", gen_spec(spec.name, steps=3, height=96, width=160), prompt)
    first = engine.core.schedule()
    assert first.new_requests[0].prompt is prompt
    engine.core.postprocess(first, engine.runner.execute(first))
    later = engine.core.schedule()
    assert not later.new_requests and [(s.request_id, s.step_index) for s in later.scheduled] == [("a", 1)]
    assert engine.runner.requests["a"].step == 1


def test_concurrent_decodes_equal_alone():
    """Two decodes at once (decode_concurrency 2: two threads of one replica, a VAE copy each) give the bytes of
    each alone."""
    spec = tiny_spec("wan")
    vae = VaeDecoderCore([spec], copies=2)
    shape = load_adapter(spec, parts=()).latent_shape(32, 48, 9)
    latents = [torch.randn(1, *shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    alone = [vae.decode(DecodeRequest(spec.name, x.numel(), "mp4", 8), x).media for x in latents]

    async def together() -> list[bytes]:
        queue = DecodeQueue(vae, "srptf", concurrency=2)
        return [d.media for d in await asyncio.gather(*(queue.decode(DecodeRequest(spec.name, x.numel(), "mp4", 8), x)
                                                         for x in latents))]

    assert asyncio.run(together()) == alone and len(set(alone)) == 3


def test_a_named_decode_is_stored_in_the_blob_store(tmp_path):
    """A video's mp4 goes from the decoder to the blob store (the job runner records only its path): the bytes a
    decode answers inline, at the path it answers."""
    spec = tiny_spec("wan")
    vae = VaeDecoderCore([spec], blobs=BlobStore(str(tmp_path)))
    shape = load_adapter(spec, parts=()).latent_shape(32, 48, 9)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    inline = vae.decode(DecodeRequest(spec.name, x.numel(), "mp4", 8), x)
    stored = vae.decode(DecodeRequest(spec.name, x.numel(), "mp4", 8, blob_name="job.mp4"), x)
    assert inline.blob is None and inline.media[4:8] == b"ftyp"
    assert stored.media is None and stored.blob == str(tmp_path / "job.mp4")
    assert (tmp_path / "job.mp4").read_bytes() == inline.media
