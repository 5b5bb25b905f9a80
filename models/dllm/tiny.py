"""A tiny Dream-layout diffusion coder (random weights, local BPE with a mask token, ChatML template).

No weights can be downloaded here, so the CPU default serves a checkpoint this script
writes in Dream's layout (`config.json` with `model_type: Dream`, `model.safetensors`,
the tokenizer), which `checkpoint.load_dllm` then loads exactly as it loads Dream-Coder
or DiffuCoder. Special tokens follow Dream's: `<|endoftext|>` is EOS and PAD,
`<|mask|>` the mask, ChatML turns between `<|im_start|>` / `<|im_end|>`. head_dim is 64.

    python -m models.dllm.tiny --out .cache/models/tiny-dllm
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from models.dllm.checkpoint import save_dream_checkpoint
from models.dllm.config import DllmConfig
from models.dllm.model import DiffusionLM
from models.tiny_checkpoint import checkpoint_cli, spread_weights, train_code_bpe

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
    return PreTrainedTokenizerFast(tokenizer_object=train_code_bpe(VOCAB_SIZE, [EOS, MASK, IM_START, IM_END]),
                                   eos_token=EOS, pad_token=EOS, mask_token=MASK,
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
    spread_weights(model, init_std)
    return model.eval(), tokenizer


def write_tiny_dllm(out: Path, seed: int = 0, max_position_embeddings: int = 1024, init_std: float = 0.2) -> Path:
    model, tokenizer = build_tiny_dllm(seed, max_position_embeddings, init_std)
    save_dream_checkpoint(model, out, tokenizer)
    (out / "tiny_dllm.json").write_text(json.dumps({"seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    return checkpoint_cli(argv, __doc__.split("\n\n")[0], "tiny diffusion coder", "tiny_dllm.json", write_tiny_dllm,
                          max_position_embeddings=1024)


if __name__ == "__main__":
    sys.exit(main())
