"""The shapes model's data, scorer and training script (models/shapes/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.media import decode_mp4, encode_mp4
from models import load_adapter
from models.shapes import train
from models.shapes.data import FRAMES, HEIGHT, WIDTH, Attributes, all_attributes, parse_caption, render_clip
from models.shapes.scorer import accuracy, read_video
from models.spec import ModelSpec


def test_captions_parse_back_to_their_attributes_and_others_do_not():
    assert all(parse_caption(a.caption) == a for a in all_attributes())
    assert parse_caption("A Red circle moving LEFT") == Attributes("red", "circle", "left")
    assert parse_caption("a blue square standing still") == Attributes("blue", "square", "still")
    assert parse_caption("a cat flying over the city") is None
    assert parse_caption("a purple circle moving left") is None  # not in the palette


@pytest.mark.parametrize("seed", [0, 1])
def test_scorer_reads_every_rendered_caption_even_through_h264(seed):
    rng = np.random.default_rng(seed)
    pairs = []
    for attributes in all_attributes():
        clip = render_clip(attributes, rng)
        assert clip.shape == (FRAMES, HEIGHT, WIDTH, 3)
        pairs.append((attributes, read_video(decode_mp4(encode_mp4(clip, fps=8))).attributes))
    assert accuracy(pairs) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}


def test_scorer_tells_wrong_videos_apart():
    rng = np.random.default_rng(3)
    clip = render_clip(Attributes("red", "circle", "left"), rng)
    read = read_video(clip).attributes
    assert accuracy([(Attributes("blue", "square", "right"), read)]) == {
        "colour": 0.0, "shape": 0.0, "direction": 0.0, "all": 0.0}
    blank = np.full_like(clip, 30)
    assert read_video(blank).attributes == Attributes("none", "none", "none")
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert accuracy([(Attributes("red", "circle", "left"), read_video(noise).attributes)])["all"] == 0.0


def test_training_script_writes_a_checkpoint_the_adapter_loads(tmp_path):
    """A few steps of every stage: the saved pipeline loads through the served from_pretrained path."""
    out = tmp_path / "shapes"
    assert train.main(["--out", str(out), "--vae-steps", "2", "--vae-batch", "2", "--clips-per-caption", "1",
                       "--steps", "2", "--batch", "4", "--eval-captions", "2", "--threads", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["seed"] == 0 and set(record["seconds"]) == {"vae", "denoiser", "evaluation"}
    assert 0.0 <= record["sampled_accuracy"]["all"] <= 1.0 and record["bytes"] > 0
    adapter = load_adapter(ModelSpec(name="shapes", family="wan", source=str(out), max_sequence_length=16,
                                     resolution_heights={"64p": 64}), parts=("text", "transformer", "vae"))
    assert adapter.geometry.spatial_factor == 4 and adapter.geometry.temporal_factor == 4
    assert adapter.latent_shape(HEIGHT, WIDTH, FRAMES) == (8, 3, 16, 28)
    vae_config = adapter.pipeline.vae.config
    assert len(vae_config.latents_mean) == 8 and all(s > 0 for s in vae_config.latents_std)

    continued = tmp_path / "continued"
    assert train.main(["--init-from", str(out), "--out", str(continued), "--clips-per-caption", "1", "--steps", "1",
                       "--batch", "2", "--eval-captions", "1", "--threads", "1"]) == 0
    record = json.loads((continued / "training.json").read_text())
    assert record["continued_from"]["command"].endswith("--threads 1") and record["final_loss"]["vae"] is None
    again = load_adapter(ModelSpec(name="shapes", family="wan", source=str(continued), max_sequence_length=16,
                                   resolution_heights={"64p": 64}), parts=("vae",)).pipeline.vae.config
    assert again.latents_mean == vae_config.latents_mean  # the VAE and its statistics are kept as they were

    fresh = tmp_path / "fresh"
    assert train.main(["--vae-from", str(out), "--out", str(fresh), "--clips-per-caption", "1", "--steps", "1",
                       "--batch", "2", "--eval-captions", "1", "--threads", "1"]) == 0
    record = json.loads((fresh / "training.json").read_text())
    assert record["vae_from"]["seed"] == 0 and record["transformer_config"]["attention_head_dim"] == 24
    kept = load_adapter(ModelSpec(name="shapes", family="wan", source=str(fresh), max_sequence_length=16,
                                  resolution_heights={"64p": 64}), parts=("vae", "transformer")).pipeline
    assert kept.vae.config.latents_std == vae_config.latents_std
    assert kept.transformer.config.ffn_dim == train.TRANSFORMER_CONFIG["ffn_dim"]
    with pytest.raises(SystemExit):  # the two ways of reusing a checkpoint exclude each other
        train.main(["--vae-from", str(out), "--init-from", str(out), "--out", str(tmp_path / "both")])
