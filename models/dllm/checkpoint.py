"""Dream-layout checkpoints (config.json `model_type: Dream` + safetensors) loaded without `trust_remote_code`.

Dream-Coder and DiffuCoder ship their modeling code inside the checkpoint and expect
`AutoModel.from_pretrained(..., trust_remote_code=True)`; a serving system must not run
code it downloaded. Here the architecture is ours (`model.DiffusionLM`): the config is
validated (`DllmConfig` refuses other architectures), the safetensors tensors are mapped
onto our parameter names, and any missing, unexpected or mis-shaped tensor is an error
naming it. The tokenizer is Qwen2's BPE read from the checkpoint's files, never the
`DreamTokenizer` class its tokenizer_config.json names (remote code too). `save_dream_checkpoint` writes the same layout (used for the tiny model and
the tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from models.dllm.config import DllmConfig
from models.dllm.model import DiffusionLM

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that training wrappers (DDP, torch.compile) put before every name; stripped when loading."""


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, or the shards of `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(path / shard))
        return tensors
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return load_file(single)


def map_names(tensors: dict[str, torch.Tensor], model: DiffusionLM) -> dict[str, torch.Tensor]:
    """Checkpoint names -> our parameter names; errors name every tensor that does not fit."""
    mapped = {}
    for name, tensor in tensors.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        mapped[name] = tensor
    if model.config.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)  # tied to the embedding; some checkpoints store it anyway
    expected = {name: p.shape for name, p in model.state_dict().items()
                if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the Dream architecture: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{n}: {tuple(mapped[n].shape)} != {tuple(s)}" for n, s in expected.items() if mapped[n].shape != s]
    if wrong:
        raise ValueError(f"checkpoint tensors of the wrong shape for its config: {wrong[:8]}")
    return mapped


def load_dllm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              attention_backend: str = "auto") -> DiffusionLM:
    """Build the model on the meta device (no random init of billions of weights), then assign the checkpoint."""
    path = Path(path)
    config = DllmConfig.from_dir(path)
    with torch.device("meta"):
        model = DiffusionLM(config, attention_backend)
    state = {n: t.to(device=device, dtype=dtype) for n, t in map_names(checkpoint_tensors(path), model).items()}
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.model.rotary_emb = Qwen2RotaryEmbedding(config.qwen2())  # its inv_freq buffer is not in checkpoints
    return model.eval()


def load_dllm_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer (special tokens and chat template from tokenizer_config.json): `tokenizer.json` when
    present, else Qwen2's BPE from `vocab.json` + `merges.txt`."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return Qwen2TokenizerFast.from_pretrained(path)
    raise FileNotFoundError(f"{path} has no tokenizer.json nor vocab.json + merges.txt")


def save_dream_checkpoint(model: DiffusionLM, path: str | Path, tokenizer=None,
                          state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` in Dream's layout: config.json (`model_type: Dream`), model.safetensors, the tokenizer.
    `state`: the weights to write instead of the model's own (a trainer's gathered full weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    config = {**model.config.to_json(), "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    state = {n: t.detach().contiguous() for n, t in state.items()
             if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
