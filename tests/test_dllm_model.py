"""The diffusion coder LM: packed forward == alone, bidirectional, Dream-layout checkpoints without remote code,
and decoding == a plain reference loop (Dream's `_sample`) for every algorithm, alone or packed with others."""

from __future__ import annotations

import json

import pytest
import torch

from models.dllm.checkpoint import load_dllm, save_dream_checkpoint
from models.dllm.config import DllmConfig, stop_token_ids
from models.dllm.decoding import ALGORITHMS, DecodeParams, DllmSequence, sample_tokens
from models.dllm.tiny import build_tiny_dllm
from tests.dllm_reference import reference_decode


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_dllm(seed=0)


def test_packed_forward_equals_each_sequence_alone(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (5, 17, 9)]
    with torch.no_grad():
        packed = model.forward_packed(torch.cat(seqs), [len(s) for s in seqs])
        alone = [model(s[None])[0] for s in seqs]
    alone = torch.cat(alone)
    tolerance = 1e-5 * alone.abs().max()  # fp32, relative to the logits' scale (GEMMs of other row counts)
    assert (packed - alone).abs().max() <= tolerance
    rows = torch.tensor([3, 20, 30])
    with torch.no_grad():
        subset = model.forward_packed(torch.cat(seqs), [5, 17, 9], logit_rows=rows)
    assert (subset - packed[rows]).abs().max() <= tolerance


def test_attention_is_bidirectional(tiny):
    model, _ = tiny
    ids = torch.arange(10, 22)[None]
    changed = ids.clone()
    changed[0, -1] = 500
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-3  # position 0 sees the last token


def test_dream_checkpoint_roundtrip_and_refusals(tiny, tmp_path):
    model, tokenizer = tiny
    path = save_dream_checkpoint(model, tmp_path / "dream", tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    loaded = load_dllm(path)
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a supported diffusion LM"):
        load_dllm(tmp_path / "other")

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    tensors["model.layers.1.extra.weight"] = torch.zeros(1)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.down_proj.weight'\].*"
                                         r"unexpected \['model.layers.1.extra.weight'\]"):
        load_dllm(path)


def test_a_cached_prefix_gives_the_full_forward_logits_when_the_prefix_is_unchanged(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (20, 13)]
    with torch.no_grad():
        full = model.forward_packed(torch.cat(seqs), [20, 13])
        first, captured = model.forward_cached(torch.cat(seqs), [20, 13], torch.arange(33), [None, None], [8, 0])
        tail, _ = model.forward_cached(torch.cat([seqs[0][8:], seqs[1]]), [12, 13], torch.arange(25),
                                       [captured[0], None], [0, 0])
    assert captured[0].length == 8 and captured[1].length == 0 and len(captured[0].keys) == 2  # one per layer
    assert torch.equal(first, full)
    assert (tail - torch.cat([full[8:20], full[20:]])).abs().max() <= 1e-5 * full.abs().max()


def test_decode_params_name_the_bad_field():
    with pytest.raises(ValueError, match=r"steps must be in 1..max_tokens \(8\), got 9"):
        DecodeParams(max_tokens=8, steps=9)
    with pytest.raises(ValueError, match="alg must be one of"):
        DecodeParams(max_tokens=8, steps=4, alg="beam")
    with pytest.raises(ValueError, match="top_p must be in"):
        DecodeParams(max_tokens=8, steps=4, top_p=1.5)
    with pytest.raises(ValueError, match=r"block_length must divide max_tokens \(8\), got 3"):
        DecodeParams(max_tokens=8, steps=4, block_length=3)
    with pytest.raises(ValueError, match="steps must be a multiple of the 4 blocks"):
        DecodeParams(max_tokens=8, steps=6, block_length=2)
    with pytest.raises(ValueError, match="prefix_cache needs block_length"):
        DecodeParams(max_tokens=8, steps=4, prefix_cache=True)


def test_entropy_unmasks_the_surest_positions_first():
    params = DecodeParams(max_tokens=4, steps=2, alg="entropy")
    seq = DllmSequence([7], params, mask_id=0, eos_ids=(1,))
    logits = torch.zeros(4, 16)
    logits[1, 5] = 30.0  # position 2 of 4 masks: peaked, lowest entropy
    logits[3, 9] = 10.0
    seq.step(logits)  # step 0 of 2 unmasks int(4 * (1 - 0.5005)) = 1 position
    assert seq.tokens.tolist() == [7, 0, 5, 0, 0]
    seq.step(torch.zeros(3, 16))  # the last step unmasks all the rest
    assert (seq.tokens[1:] != 0).all()


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # top_k 1 and a tiny top_p keep only the argmax, even at temperature 1
        for params in (DecodeParams(4, 1, temperature=1.0, top_k=1), DecodeParams(4, 1, temperature=1.0, top_p=0.01)):
            assert sample_tokens(logits, params, g)[0].item() == 1
    margin = sample_tokens(logits, DecodeParams(4, 1, alg="topk_margin"), g)[1]
    probs = torch.softmax(logits, -1)[0]
    assert margin.item() == pytest.approx((probs[1] - probs[2]).item())


def test_response_stops_at_the_first_eos():
    seq = DllmSequence([7, 8], DecodeParams(max_tokens=5, steps=5), mask_id=0, eos_ids=(1,))
    seq.tokens[2:] = torch.tensor([4, 5, 1, 6, 1])
    assert seq.response_ids() == [4, 5] and seq.final
    seq.tokens[3] = 0
    assert seq.response_ids() == [4] and not seq.final


def decode_packed(model, requests: list[tuple[list[int], DecodeParams]], mask_id: int, eos_ids: tuple[int, ...]):
    """The engine's way: every unfinished sequence's step in one packed forward, logits only where needed."""
    seqs = [DllmSequence(p, params, mask_id, eos_ids) for p, params in requests]
    while not all(s.done for s in seqs):
        live = [s for s in seqs if not s.done]
        starts = [0]
        for s in live[:-1]:
            starts.append(starts[-1] + s.length)
        rows = [s.logit_rows() + start for s, start in zip(live, starts)]
        with torch.no_grad():
            logits = model.forward_packed(torch.cat([s.tokens for s in live]), [s.length for s in live],
                                          logit_rows=torch.cat(rows))
        for s, chunk in zip(live, logits.split([len(r) for r in rows])):
            s.step(chunk)
    return [s.tokens[s.prompt_len:].tolist() for s in seqs]


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_packed_decoding_equals_the_reference_loop(tiny, alg):
    model, tokenizer = tiny
    mask_id, eos_ids = model.config.mask_token_id, stop_token_ids(model.config, tokenizer)
    prompts = [tokenizer.encode(t) for t in ("def add(a, b):", "import os\nclass Path:", "x = [")]
    requests = [(prompts[0], DecodeParams(max_tokens=12, steps=6, alg=alg, seed=1)),
                (prompts[1], DecodeParams(max_tokens=20, steps=10, alg=alg, temperature=0.8, top_p=0.9, seed=2,
                                          eos_penalty=2.0)),
                (prompts[2], DecodeParams(max_tokens=7, steps=7, alg=alg, temperature=1.0, top_k=20,
                                          alg_temp=0.5, seed=3))]
    packed = decode_packed(model, requests, mask_id, eos_ids)
    for (prompt, params), got in zip(requests, packed):
        expected = reference_decode(model, prompt, params, mask_id, eos_ids)
        assert got == expected
        assert mask_id not in got
    assert decode_packed(model, requests[1:2], mask_id, eos_ids)[0] == packed[1]  # alone == packed


def test_config_refuses_bad_token_ids():
    with pytest.raises(ValueError, match="mask_token_id 99 outside the vocabulary"):
        DllmConfig(model_type="Dream", vocab_size=50, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, mask_token_id=99,
                   pad_token_id=0, eos_token_id=0)


def test_confidence_threshold_unmasks_every_sure_position_and_ends_when_no_mask_is_left():
    params = DecodeParams(max_tokens=4, steps=4, alg="maskgit_plus", confidence_threshold=0.9)
    seq = DllmSequence([7], params, mask_id=0, eos_ids=(1,))
    logits = torch.zeros(4, 16)
    logits[0, 5] = logits[2, 6] = 30.0  # two sure positions; Dream's schedule plans int(4 * 0.2498) = 0 this step
    seq.step(logits)
    assert seq.tokens.tolist() == [7, 5, 0, 6, 0] and not seq.final
    seq.step(torch.zeros(2, 16))  # none sure: still one position per step
    assert (seq.tokens == 0).sum() == 1 and seq.step_index == 2
    seq.tokens[4] = 0
    seq.tokens[2] = 0
    logits = torch.zeros(2, 16)
    logits[:, 9] = 30.0
    seq.step(logits)
    assert seq.tokens.tolist() == [7, 5, 9, 6, 9] and seq.final and seq.step_index == 3
    with pytest.raises(ValueError, match="confidence_threshold needs a confidence-ranked alg"):
        DecodeParams(max_tokens=4, steps=4, alg="origin", confidence_threshold=0.9)


def test_sharded_checkpoint_with_wrapper_prefixes_loads(tiny, tmp_path):
    """Large checkpoints come as shards named by model.safetensors.index.json; training wrappers prefix names."""
    from safetensors.torch import save_file

    model, tokenizer = tiny
    path = save_dream_checkpoint(model, tmp_path / "sharded", tokenizer)
    (path / "model.safetensors").unlink()
    state = {f"module.{n}": t.contiguous() for n, t in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / shard)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        assert torch.equal(load_dllm(path)(ids), model(ids))


def test_tied_embeddings_checkpoint_round_trip(tmp_path):
    from models.dllm.model import DiffusionLM

    config = DllmConfig(model_type="Dream", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                        tie_word_embeddings=True, mask_token_id=63, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = DiffusionLM(config).eval()
    path = save_dream_checkpoint(model, tmp_path / "tied")
    loaded = load_dllm(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
