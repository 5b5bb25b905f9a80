"""Checks a checkpoint directory before its weights replace the served ones.

vLLM's in-place reload copies tensors into the existing parameters, so a
checkpoint of another shape would fail half-way and leave a mixed model. Every
check that can be made from the files happens here, before the engine pauses.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

# Fields that fix parameter names and shapes; any difference makes a reload impossible.
SHAPE_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


class IncompatibleCheckpoint(ValueError):
    """The directory cannot replace the served weights; the message says why."""


def read_model_config(source: str) -> dict:
    """The model config of a local directory or (cached) hub id, with defaults filled in."""
    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as exc:
        raise IncompatibleCheckpoint(f"cannot read the model config of {source!r}: {exc}") from exc


def check_reloadable(checkpoint_dir: str, served_config: dict) -> Path:
    """Return the resolved directory if its architecture matches `served_config`, else raise."""
    directory = Path(checkpoint_dir)
    if not directory.is_absolute():
        raise IncompatibleCheckpoint(f"checkpoint_dir must be an absolute path, got {checkpoint_dir!r}")
    if not directory.is_dir():
        raise IncompatibleCheckpoint(f"checkpoint_dir {checkpoint_dir!r} is not a directory on the serving node")
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise IncompatibleCheckpoint(f"checkpoint_dir {checkpoint_dir!r} holds no weight files ({WEIGHT_PATTERNS})")
    candidate = read_model_config(str(directory))
    mismatched = [
        f"{field}: served {served_config.get(field)!r}, checkpoint {candidate.get(field)!r}"
        for field in SHAPE_FIELDS
        if served_config.get(field) != candidate.get(field)
    ]
    if mismatched:
        raise IncompatibleCheckpoint("checkpoint architecture differs from the served model: " + "; ".join(mismatched))
    return directory.resolve()


def expected_shapes(source: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the served model in HF checkpoint format, from its config alone (built on
    the meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                     tied_embeddings: bool) -> None:
    """Raise unless in-memory weights (`name -> shape`) can replace the served ones: every name known, every shape
    equal, nothing missing (a tied `lm_head.weight` may be left out: it is the embedding)."""
    unknown = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes) - ({"lm_head.weight"} if tied_embeddings else set()))
    wrong = [f"{name}: served {expected[name]}, sent {shapes[name]}"
             for name in sorted(set(shapes) & set(expected)) if tuple(shapes[name]) != expected[name]]
    problems = ([f"unknown parameters {unknown[:5]}"] if unknown else []) + \
               ([f"missing parameters {missing[:5]}"] if missing else []) + wrong[:5]
    if problems:
        raise IncompatibleCheckpoint("weights differ from the served model: " + "; ".join(problems))
