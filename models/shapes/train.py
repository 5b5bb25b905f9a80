"""Train the shapes text-to-video model on 2 CPU cores and save it as a diffusers Wan checkpoint.

    python -m models.shapes.train --out models/shapes/checkpoint --seed 0

Three stages, all on clips from `models.shapes.data`:

1. a tokenizer (byte-level BPE on the captions) and a Wan VAE (`AutoencoderKLWan`, 4x
   spatial and 4x temporal compression, 8 latent channels) trained to reconstruct clips;
   the latents' per-channel mean and std go into its config as Wan's `latents_mean` /
   `latents_std`, so `WanPipeline` and the engine normalise them as for the real models;
2. a UMT5 text encoder and a Wan transformer (`WanTransformer3DModel`) trained together
   with the flow-matching loss Wan is trained with (x_t = (1 - s) x0 + s noise, the target
   noise - x0, s drawn with the scheduler's shift), the caption dropped for 10% of the
   clips so classifier-free guidance has an unconditional model;
3. an exponential moving average of stage 2's weights saved with the scheduler
   (`UniPCMultistepScheduler`, flow sigmas, as Wan ships) through
   `WanPipeline.save_pretrained`, loaded by the service with `from_pretrained`.

Because the classes are diffusers' own, every engine path (packing, Brick shards, the
VAE decoder) serves the result unchanged. `training.json` beside the weights records
the command, seed, seconds per stage, final losses and the accuracy of one video per
caption sampled with `WanPipeline` and read by `models.shapes.scorer`.

`--init-from CHECKPOINT` continues an earlier run: its VAE, tokenizer and scheduler are kept
as they are (stage 1 is skipped; the clips are encoded with that VAE and normalised with
its saved statistics) and stage 2 starts from its transformer and text encoder, with a
fresh warm-up and cosine schedule. The earlier `training.json` is kept under
`continued_from`, so the record holds every leg's command and seconds.

`--vae-from CHECKPOINT` keeps only that checkpoint's VAE and its statistics (stage 1 is skipped) and
trains a fresh tokenizer, text encoder and transformer of this file's configs: how a new transformer
shape is tried without paying for the VAE again. The VAE's run is kept under `vae_from`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from models.shapes.data import FRAMES, HEIGHT, WIDTH, all_attributes, render_clip
from models.shapes.scorer import accuracy, read_video
from models.tokenizer import train_bpe_tokenizer

TEXT_TOKENS = 16
"""Caption tokens the text encoder sees (max_sequence_length of the served model)."""
FLOW_SHIFT = 3.0
CAPTION_DROPOUT = 0.1
EVAL_STEPS, EVAL_GUIDANCE = 20, 5.0
"""The sampling the served model defaults to (configs/local.yaml)."""

VAE_CONFIG = dict(base_dim=16, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                  temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4)
VAE_CROP = (48, 64, 5)
"""(height, width, frames) of the VAE's training clips: convolutions are shift-invariant and causal in time, so
smaller clips teach the same maps at a fraction of the cost (48 rows: the least that fits a 28-pixel shape's vertical
path with its margins; the committed VAE was trained on 40 x 64 crops of 18-pixel shapes). The decoder's base width of 8 halves the decode's
cost, yet a 64p decode (~0.2 s) still takes longer than the 20 denoising steps (~0.11 s)."""
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=8, out_channels=8, text_dim=64,
    freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=256,
)
"""The committed checkpoint's transformer (0.6M parameters). A wider one (4 heads of 32, feed-forward 512) trained
from this VAE with `--vae-from` read shapes no better (docs/shapes_model.md)."""
TEXT_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def caption_corpus() -> list[str]:
    """Every caption, a few times over: what the tokenizer is trained on."""
    return [a.caption for a in all_attributes()] * 4


def to_pixels(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def render_batch(rng: np.random.Generator, size: int, height: int, width: int, frames: int) -> np.ndarray:
    choices = all_attributes()
    return np.stack([render_clip(choices[i], rng, height, width, frames) for i in rng.integers(0, len(choices), size)])


def new_pipeline(vae: AutoencoderKLWan) -> WanPipeline:
    """Stage 2's starting point: a tokenizer trained on the captions, a fresh text encoder and transformer."""
    tokenizer = train_bpe_tokenizer(caption_corpus(), vocab_size=320, model_max_length=TEXT_TOKENS)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_CONFIG))
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                       transformer=WanTransformer3DModel(**TRANSFORMER_CONFIG), vae=vae, scheduler=scheduler)


def train_vae(steps: int, batch: int, rng: np.random.Generator, log: list[float]) -> AutoencoderKLWan:
    """Reconstruction (MSE) with a small KL term on VAE_CROP clips, AdamW with a cosine decay."""
    vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=[0.0] * VAE_CONFIG["z_dim"],
                           latents_std=[1.0] * VAE_CONFIG["z_dim"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.train()
    for step in range(steps):
        x = to_pixels(render_batch(rng, batch, *VAE_CROP))
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append(float(loss))
        if step % 50 == 0:
            print(f"vae step {step}: loss {float(loss):.5f}", flush=True)
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKLWan, clips_per_caption: int, rng: np.random.Generator
                   ) -> tuple[list[str], torch.Tensor]:
    """Captions and raw latent means (N, C, F', H', W') of `clips_per_caption` clips of every caption."""
    captions, latents = [], []
    for attributes in all_attributes():
        clips = np.stack([render_clip(attributes, rng) for _ in range(clips_per_caption)])
        latents.append(vae.encode(to_pixels(clips)).latent_dist.mean)
        captions += [attributes.caption] * clips_per_caption
    return captions, torch.cat(latents)


def shifted_sigmas(u: torch.Tensor) -> torch.Tensor:
    """The scheduler's time shift applied to uniform draws: training sees noise levels as sampling visits them."""
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def train_denoiser(pipeline: WanPipeline, captions: list[str], latents: torch.Tensor, steps: int, batch: int,
                   generator: torch.Generator, log: list[float], lr: float = 1e-3
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Flow matching on normalised latents; returns EMA state dicts of the transformer and the text encoder."""
    modules = {"transformer": pipeline.transformer, "text_encoder": pipeline.text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
    for m in modules.values():
        m.train()
    for step in range(steps):
        index = torch.randint(0, len(captions), (batch,), generator=generator)
        x0 = latents[index]
        drop = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        prompts = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        text = pipeline._get_t5_prompt_embeds(prompts, max_sequence_length=TEXT_TOKENS, device=torch.device("cpu"),
                                              dtype=torch.float32)
        sigma = shifted_sigmas(torch.rand(batch, generator=generator)).view(batch, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = pipeline.transformer(hidden_states=noisy, timestep=sigma.flatten() * 1000,
                                          encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, m in modules.items():
                for key, value in m.state_dict().items():
                    if value.is_floating_point():
                        ema[name][key].mul_(decay).add_(value, alpha=1 - decay)
        log.append(float(loss))
        if step % 100 == 0:
            print(f"denoiser step {step}: loss {float(loss):.4f}", flush=True)
    return ema


@torch.no_grad()
def sample_accuracy(pipeline: WanPipeline, seed: int, captions: int) -> dict[str, float]:
    """One video for each of the first `captions` captions through WanPipeline's own loop, read by the scorer."""
    pairs = []
    for i, attributes in enumerate(all_attributes()[:captions]):
        video = pipeline(prompt=attributes.caption, negative_prompt="", height=HEIGHT, width=WIDTH,
                         num_frames=FRAMES, num_inference_steps=EVAL_STEPS, guidance_scale=EVAL_GUIDANCE,
                         max_sequence_length=TEXT_TOKENS, output_type="np",
                         generator=torch.Generator().manual_seed(seed + i)).frames[0]
        pairs.append((attributes, read_video((np.asarray(video) * 255).round().astype(np.uint8)).attributes))
    return accuracy(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--clips-per-caption", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3000, help="denoiser optimisation steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="denoiser peak learning rate")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="a checkpoint of this script to continue: its VAE is kept, stage 2 starts from it")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="a checkpoint of this script whose VAE is kept; stage 2 trains fresh models")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-captions", type=int, default=len(all_attributes()))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.init_from is not None and args.vae_from is not None:
        parser.error("--init-from continues a whole checkpoint; --vae-from keeps only a VAE: give one")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    record: dict = {"command": "python -m models.shapes.train " + shlex.join(sys.argv[1:] if argv is None else argv),
                    "seed": args.seed, "seconds": {}, "vae_config": VAE_CONFIG}

    start = time.perf_counter()
    vae_log: list[float] = []
    continued: WanPipeline | None = None
    if args.init_from is not None:
        continued = WanPipeline.from_pretrained(args.init_from)
        record["continued_from"] = json.loads((args.init_from / "training.json").read_text())
        vae = continued.vae.eval()
    elif args.vae_from is not None:
        vae = AutoencoderKLWan.from_pretrained(args.vae_from / "vae").eval()
        record["vae_from"] = json.loads((args.vae_from / "training.json").read_text())
    else:
        vae = train_vae(args.vae_steps, args.vae_batch, rng, vae_log)
    captions, raw = encode_dataset(vae, args.clips_per_caption, rng)
    if vae_log:  # a new VAE: its latents' per-channel statistics, as Wan's config carries them
        vae.register_to_config(latents_mean=raw.mean(dim=(0, 2, 3, 4)).tolist(),
                               latents_std=raw.std(dim=(0, 2, 3, 4)).tolist())
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    record["seconds"]["vae"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    pipeline = continued if continued is not None else new_pipeline(vae)
    transformer, text_encoder = pipeline.transformer, pipeline.text_encoder
    record["transformer_config"] = {key: list(value) if isinstance(value, tuple) else value
                                    for key, value in transformer.config.items() if not key.startswith("_")}
    dit_log: list[float] = []
    ema = train_denoiser(pipeline, captions, latents, args.steps, args.batch, generator, dit_log, args.lr)
    transformer.load_state_dict(ema["transformer"])
    text_encoder.load_state_dict(ema["text_encoder"])
    transformer.eval()
    text_encoder.eval()
    record["seconds"]["denoiser"] = round(time.perf_counter() - start, 1)
    record["final_loss"] = {"vae": float(np.mean(vae_log[-50:])) if vae_log else None,
                            "denoiser": float(np.mean(dit_log[-200:]))}

    args.out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(args.out, safe_serialization=True)
    start = time.perf_counter()
    record["sampled_accuracy"] = sample_accuracy(pipeline, args.seed, args.eval_captions)
    record["seconds"]["evaluation"] = round(time.perf_counter() - start, 1)
    record["bytes"] = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
