"""The real `from_pretrained` path, on tiny checkpoints saved to a temp dir (no download)."""

from __future__ import annotations

import pytest
import torch

from models import load_adapter
from tests.conftest import tiny_spec


@pytest.mark.parametrize("family", ["cogvideox", "wan", "ltx"])
def test_checkpoint_round_trip_loads_only_requested_parts(family, tmp_path):
    tiny = tiny_spec(family)
    load_adapter(tiny, parts=("text", "transformer", "vae")).pipeline.save_pretrained(tmp_path)
    saved = tiny.model_copy(update={"source": str(tmp_path)})

    worker = load_adapter(saved, parts=("transformer",))
    assert worker.pipeline.transformer is not None
    assert worker.pipeline.vae is None and worker.pipeline.text_encoder is None
    assert worker.geometry == load_adapter(tiny, parts=()).geometry

    reference = load_adapter(tiny, parts=("text", "transformer"))
    prompt = reference.encode(["a cat"], [""])[0]
    loaded_prompt = load_adapter(saved, parts=("text",)).encode(["a cat"], [""])[0]
    torch.testing.assert_close(loaded_prompt.cond, prompt.cond, rtol=0, atol=0)
    shape = reference.latent_shape(32, 48, 9)
    sampler = reference.new_sampler(4, shape)
    x = reference.initial_latents(shape, seed=0, sampler=sampler)
    t = sampler.timesteps[1]
    expected = reference.forward_packed([x[0]], [t], [prompt.cond])[0]
    torch.testing.assert_close(worker.forward_packed([x[0]], [t], [prompt.cond])[0], expected, rtol=0, atol=1e-6)


def test_unknown_checkpoint_path_fails_clearly(tmp_path):
    spec = tiny_spec("cogvideox").model_copy(update={"source": str(tmp_path / "missing")})
    with pytest.raises(Exception, match="missing"):
        load_adapter(spec, parts=("transformer",))
