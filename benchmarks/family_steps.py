"""Step time per model layout on this CPU: four requests of different sizes packed in one step vs each alone.

For every tiny layout the CPU default serves (Wan 2.1, Wan 2.2 A14B with its two experts,
Wan 2.2 TI2V-5B, CogVideoX 1.0 / 1.5, LTX-Video, Mochi, HunyuanVideo 1.5, and the image-to-video entries of
LTX-Video and TI2V-5B, whose first frame's tokens are modulated apart): four requests at 240p-class
sizes (16:9, the frame counts and timesteps differ; CFG on, so eight forward rows),
timed as one packed `forward_packed` (a two-expert model: one forward per expert, two
requests at high noise and two at low) against the four requests' forwards one after
another (what a per-request server runs). Median of --repeats, one process, the
machine's threads.

    python -m benchmarks.family_steps [--repeats 5] [--layouts hunyuanvideo15 mochi]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import median_seconds
from models import load_adapter
from models.spec import ModelSpec

LAYOUTS = {  # name: (family, tiny_variant, image_input)
    "wan2.1": ("wan", "default", False),
    "wan2.2-a14b": ("wan", "wan2.2-a14b", False),
    "wan2.2-ti2v-5b": ("wan", "wan2.2-ti2v-5b", False),
    "wan2.2-ti2v-5b-i2v": ("wan", "wan2.2-ti2v-5b", True),
    "cogvideox1.0": ("cogvideox", "default", False),
    "cogvideox1.5": ("cogvideox", "cogvideox1.5", False),
    "ltx": ("ltx", "default", False),
    "ltx-i2v": ("ltx", "default", True),
    "mochi": ("mochi", "default", False),
    "hunyuanvideo15": ("hunyuanvideo15", "default", False),
}
SIZES = [(128, 224, 9), (160, 288, 9), (192, 352, 17), (240, 416, 9)]
"""(height, width, frames) of the four requests; each rounded down to the layout's pixel and frame multiples."""


def _rows(family: str, variant: str, image_input: bool,
          ) -> tuple[object, list[torch.Tensor], list[torch.Tensor], list[dict]]:
    spec = ModelSpec(name=f"{family}-{variant}", family=family, tiny_variant=variant, image_input=image_input,
                     max_sequence_length=16, max_frames=17, default_frames=9)
    adapter = load_adapter(spec, ["text", "transformer"])
    g = adapter.geometry
    prompts = adapter.encode(["a red circle moving left", "a city at night in the rain", "waves", "a cat"],
                             ["", "", "", ""])
    latents, timesteps, conds = [], [], []
    for i, (height, width, frames) in enumerate(SIZES):
        height, width = height // g.pixel_multiple * g.pixel_multiple, width // g.pixel_multiple * g.pixel_multiple
        frames = (frames - 1) // g.frame_multiple * g.frame_multiple + 1
        shape = adapter.latent_shape(height, width, frames)
        sampler = adapter.new_sampler(8, shape)
        x = adapter.initial_latents(shape, seed=i, sampler=sampler)[0]
        t = sampler.timesteps[1 if i < 2 else 6]  # two early (high noise) and two late steps
        extra = {**adapter.request_condition(None), **adapter.image_placeholder(shape)}  # zero image latents
        for cond in prompts[i].with_condition(extra).rows_in_order:
            latents.append(x)
            timesteps.append(t)
            conds.append(cond)
    return adapter, latents, timesteps, conds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args(argv)
    print(f"{'layout':<16} {'experts':>7} {'tokens':>7} {'packed ms':>10} {'alone ms':>9} {'alone/packed':>13}")
    with torch.no_grad():
        for name in args.layouts:
            family, variant, image_input = LAYOUTS[name]
            adapter, latents, timesteps, conds = _rows(family, variant, image_input)
            tokens = sum(adapter.row_tokens(tuple(x.shape), c) for x, c in zip(latents, conds))
            packed = median_seconds(lambda: adapter.forward_packed(latents, timesteps, conds), args.repeats)
            pairs = [slice(i, i + 2) for i in range(0, len(latents), 2)]  # each request's [uncond, cond] rows
            alone = median_seconds(lambda: [adapter.forward_packed(latents[s], timesteps[s], conds[s])
                                            for s in pairs], args.repeats)
            experts = len({adapter.expert_index(t) for t in timesteps})
            print(f"{name:<16} {experts:>7} {tokens:>7} {1e3 * packed:>10.1f} {1e3 * alone:>9.1f} "
                  f"{alone / packed:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
