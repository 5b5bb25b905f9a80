"""FLOPs of each video family's VAE decoder per output pixel-frame, counted at its released config.

The H100 cost profile prices a job's decode from these (`cost_profiles.VAE_DECODE_FLOPS_PER_VOXEL`).
The decoders are built on the meta device (no weights, no compute) from diffusers' default configs, which are
the released checkpoints' (CogVideoX, Mochi 1, Wan 2.1), and torch's FlopCounterMode counts a decode of 3 latent
frames of 8 x 8 latents; the count over the output's frames x height x width is the per-voxel cost.

    python -m benchmarks.vae_flops
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLMochi, AutoencoderKLWan
from torch.utils.flop_counter import FlopCounterMode

VAES = {"cogvideox": AutoencoderKLCogVideoX, "mochi": AutoencoderKLMochi, "wan": AutoencoderKLWan}
LATENT_CHANNELS = {"cogvideox": 16, "mochi": 12, "wan": 16}


def flops_per_voxel(family: str, latent_frames: int = 3, latent_side: int = 8) -> float:
    with torch.device("meta"):
        vae = VAES[family]()
        latents = torch.randn(1, LATENT_CHANNELS[family], latent_frames, latent_side, latent_side)
        with FlopCounterMode(display=False) as counter:
            video = vae.decode(latents).sample
    return counter.get_total_flops() / video[0, 0].numel()


def main() -> None:
    for family in VAES:
        print(f"{family}: {flops_per_voxel(family) / 1e6:.2f} MFLOP per output pixel-frame")


if __name__ == "__main__":
    main()
