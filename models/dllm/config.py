"""The architecture config of a Dream-layout checkpoint (`config.json`, `model_type: Dream`), validated.

Dream's config is Qwen2's plus the diffusion special tokens (mask, pad). Only what the
forward and the decoder need is read; a checkpoint of another architecture is refused
here, before any weight is touched, instead of being run by remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import Qwen2Config

SUPPORTED_MODEL_TYPES = ("Dream",)
SUPPORTED_ARCHITECTURES = ("DreamModel",)


class DllmConfig(BaseModel):
    """Qwen2 dimensions + special tokens; field names as in Dream's config.json."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: str
    architectures: tuple[str, ...] = ("DreamModel",)
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> "DllmConfig":
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a supported diffusion LM; supported: "
                             f"{list(SUPPORTED_MODEL_TYPES)} (Dream-Coder and DiffuCoder checkpoints)")
        unknown = [a for a in self.architectures if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise ValueError(f"architectures {unknown} are not supported; supported: {list(SUPPORTED_ARCHITECTURES)}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} / "
                             f"num_key_value_heads {self.num_key_value_heads} do not divide")
        for name in ("mask_token_id", "pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} outside the vocabulary 0..{self.vocab_size - 1}")
        return self

    @classmethod
    def from_dir(cls, path: str | Path) -> "DllmConfig":
        config_path = Path(path) / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: not a Dream-layout checkpoint directory")
        data = json.loads(config_path.read_text())
        if "model_type" not in data:
            raise ValueError(f"{config_path} has no model_type")
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def qwen2(self) -> Qwen2Config:
        """The same dimensions as a transformers Qwen2Config, for its RMSNorm / MLP / rotary building blocks."""
        return Qwen2Config(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                           max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
                           rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act,
                           tie_word_embeddings=self.tie_word_embeddings)

    def to_json(self) -> dict:
        return {**self.model_dump(exclude_none=True), "architectures": list(self.architectures)}


def stop_token_ids(config: DllmConfig, tokenizer) -> tuple[int, ...]:
    """Tokens that end a response: EOS, PAD and, for chat checkpoints, the end of the assistant's turn."""
    ids = {config.eos_token_id, config.pad_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer is not None else None
    if isinstance(end_of_turn, int) and end_of_turn != getattr(tokenizer, "unk_token_id", None):
        ids.add(end_of_turn)
    return tuple(sorted(ids))
