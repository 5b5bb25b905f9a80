"""What the tiny random-weight coder checkpoints share: the AR coder (`deployments/coder/tiny_model.py`) and the
diffusion coder (`models/dllm/tiny.py`).

No weights or tokenizers can be downloaded here, so both are written locally: a
byte-level BPE trained on the standard library's Python sources (deterministic for a
given Python install), weights drawn wider than the usual 0.02 so that decoded tokens
depend clearly on them, and one command-line entry that writes a checkpoint unless
the directory already holds the same seed.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def python_sources(max_files: int = 120) -> list[str]:
    """Python sources of the standard library: real code, present on every machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:max_files]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


def train_code_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the special ones first) trained on `python_sources()`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(python_sources(), trainer=trainer)
    return tokenizer


@torch.no_grad()
def spread_weights(model: torch.nn.Module, std: float) -> None:
    """Redraw every matrix N(0, std): the usual 0.02 gives near-uniform logits; a wider spread makes greedy tokens
    depend clearly on the weights, so a reload or a training step visibly changes outputs."""
    for param in model.parameters():
        if param.dim() > 1:
            param.normal_(0.0, std)


def checkpoint_cli(argv: list[str] | None, description: str, what: str, marker: str,
                   write: Callable[[Path, int, int, float], Path], max_position_embeddings: int,
                   init_std_help: str | None = None) -> int:
    """`--out DIR [--seed N] [--max-position-embeddings N] [--init-std S] [--force]`: write the checkpoint with
    `write(out, seed, max_position_embeddings, init_std)`, or say that `out/marker` already records this seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=max_position_embeddings)
    parser.add_argument("--init-std", type=float, default=0.2, help=init_std_help)
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    recorded = args.out / marker
    if recorded.exists() and not args.force and json.loads(recorded.read_text()).get("seed") == args.seed:
        print(f"{args.out} already holds the {what} (seed {args.seed})")
        return 0
    write(args.out, args.seed, args.max_position_embeddings, args.init_std)
    print(f"wrote {what} (seed {args.seed}) to {args.out}")
    return 0
