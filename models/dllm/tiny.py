"""A tiny Dream-layout diffusion coder (random weights, local BPE with a mask token, ChatML template).

No weights can be downloaded here, so the CPU default serves a checkpoint this script
writes in Dream's layout (`config.json` with `model_type: Dream`, `model.safetensors`,
the tokenizer), which `checkpoint.load_dllm` then loads exactly as it loads Dream-Coder
or DiffuCoder. Special tokens follow Dream's: `<|endoftext|>` is EOS and PAD,
`<|mask|>` the mask, ChatML turns between `<|im_start|>` / `<|im_end|>`. head_dim is 64.

    python -m models.dllm.tiny --out .cache/models/tiny-dllm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models.dllm.checkpoint import save_dream_checkpoint
from models.dllm.config import DllmConfig
from models.dllm.model import DiffusionLM
from models.tokenizer import python_sources

EOS, MASK, IM_START, IM_END = "<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS, MASK, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(python_sources(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, mask_token=MASK,
                                   additional_special_tokens=[IM_START, IM_END], model_max_length=model_max_length,
                                   chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer: PreTrainedTokenizerFast, max_position_embeddings: int) -> DllmConfig:
    return DllmConfig(model_type="Dream", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=max_position_embeddings, mask_token_id=tokenizer.mask_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def build_tiny_dllm(seed: int = 0, max_position_embeddings: int = 1024,
                    init_std: float = 0.2) -> tuple[DiffusionLM, PreTrainedTokenizerFast]:
    """The model in memory; `init_std` 0.2 spreads the logits so decoded tokens depend clearly on the weights."""
    tokenizer = build_tokenizer(max_position_embeddings)
    torch.manual_seed(seed)
    model = DiffusionLM(tiny_config(tokenizer, max_position_embeddings))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, init_std)
    return model.eval(), tokenizer


def write_tiny_dllm(out: Path, seed: int = 0, max_position_embeddings: int = 1024, init_std: float = 0.2) -> Path:
    model, tokenizer = build_tiny_dllm(seed, max_position_embeddings, init_std)
    save_dream_checkpoint(model, out, tokenizer)
    (out / "tiny_dllm.json").write_text(json.dumps({"seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=1024)
    parser.add_argument("--init-std", type=float, default=0.2)
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    marker = args.out / "tiny_dllm.json"
    if marker.exists() and not args.force and json.loads(marker.read_text()).get("seed") == args.seed:
        print(f"{args.out} already holds the tiny diffusion coder (seed {args.seed})")
        return 0
    write_tiny_dllm(args.out, args.seed, args.max_position_embeddings, args.init_std)
    print(f"wrote tiny diffusion coder (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
