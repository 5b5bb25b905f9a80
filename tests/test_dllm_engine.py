"""Diffusion-LM requests through the step scheduler core and the dLLM runner: joining and leaving at every step,
packed with other lengths and step counts, equal to Dream's reference loop; streamed prefixes; cancel; faults."""

from __future__ import annotations

import pytest
import torch

from engine.config import BudgetConfig
from engine.dllm_runner import DllmModel, DllmRunner
from engine.messages import NewDllmRequest
from engine.policies import make_policy
from engine.request import RequestStatus
from engine.scheduler import StepSchedulerCore
from models.dllm.config import stop_token_ids
from models.dllm.decoding import DecodeParams, DllmSequence
from models.dllm.tiny import build_tiny_dllm
from tests.dllm_reference import reference_decode

MODEL = "tiny-dllm"


@pytest.fixture(scope="module")
def tiny():
    network, tokenizer = build_tiny_dllm(seed=0, max_position_embeddings=64)
    return DllmModel(network, network.config.mask_token_id, stop_token_ids(network.config, tokenizer)), tokenizer


def _core(max_batch_size: int = 8) -> StepSchedulerCore:
    return StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=max_batch_size))


def _request(tokenizer, i: int, text: str, **params) -> NewDllmRequest:
    return NewDllmRequest(f"r{i}", MODEL, tuple(tokenizer.encode(text)), DecodeParams(seed=i, **params))


def test_requests_join_and_leave_at_every_step_and_equal_the_reference(tiny):
    model, tokenizer = tiny
    core, runner = _core(max_batch_size=3), DllmRunner({MODEL: model})
    requests = [_request(tokenizer, 0, "def f(x):", max_tokens=16, steps=8, alg="entropy"),
                _request(tokenizer, 1, "import sys", max_tokens=6, steps=3, alg="maskgit_plus", temperature=0.7),
                _request(tokenizer, 2, "class A:\n    pass", max_tokens=10, steps=10, alg="origin", temperature=1.0),
                _request(tokenizer, 3, "for i in range(", max_tokens=12, steps=4, alg="topk_margin", alg_temp=0.3,
                         temperature=0.5, top_p=0.9)]
    arrivals = {0: requests[:2], 2: requests[2:3], 3: requests[3:]}  # step index -> requests admitted before it
    assert core.admit(requests[0]) and core.pool["r0"].remaining_cost == 8 * (len(requests[0].prompt_ids) + 16)
    core.admit(requests[1])
    finished, packs, prefixes = {}, [], {}
    step = 0
    while core.pool or step < 4:
        for new in arrivals.get(step, []) if step else []:
            core.admit(new)
        plan = core.schedule()
        if plan is None:
            break
        packs.append(len(plan.scheduled))
        result = runner.execute(plan)
        assert not result.errors
        finished.update(result.finished)
        for request_id, prefix in result.prefixes.items():
            assert prefix[:len(prefixes.get(request_id, ()))] == prefixes.get(request_id, ())  # only ever grows
            prefixes[request_id] = prefix
        core.postprocess(plan, result)
        step += 1
    assert max(packs) == 3 and sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert not runner.held  # every finished request's state left the worker
    for new in requests:
        expected = reference_decode(model.network, list(new.prompt_ids), new.params, model.mask_id, model.stop_ids)
        response = []
        for token in expected:
            if token in model.stop_ids:
                break
            response.append(token)
        assert finished[new.request_id].tolist() == response
        assert prefixes.get(new.request_id, ()) == tuple(response)


def test_cancel_frees_the_worker_state_and_others_continue(tiny):
    model, tokenizer = tiny
    core, runner = _core(), DllmRunner({MODEL: model})
    core.admit(_request(tokenizer, 0, "x = 1", max_tokens=8, steps=8))
    core.admit(_request(tokenizer, 1, "y = 2", max_tokens=8, steps=4))
    core.step(runner.execute)
    assert set(runner.held) == {"r0", "r1"}
    assert core.cancel("r0")
    core.step(runner.execute)  # the next plan frees r0 on the worker
    assert set(runner.held) == {"r1"}
    while core.pool:
        core.step(runner.execute)
    done = {m.request_id: m.status for m in core.pop_done()}
    assert done == {"r0": RequestStatus.CANCELLED, "r1": RequestStatus.FINISHED}


def test_a_request_over_the_context_fails_alone(tiny):
    model, tokenizer = tiny
    core, runner = _core(), DllmRunner({MODEL: model})
    core.admit(_request(tokenizer, 0, "ok", max_tokens=8, steps=2))
    core.admit(_request(tokenizer, 1, "too long", max_tokens=63, steps=2))
    while core.pool:
        core.step(runner.execute)
    done = {m.request_id: m for m in core.pop_done()}
    assert done["r0"].status == RequestStatus.FINISHED
    assert done["r1"].status == RequestStatus.FAILED and "exceed the model's context of 64" in done["r1"].error


def test_a_forward_fault_is_isolated_to_its_request(tiny, monkeypatch):
    model, tokenizer = tiny
    core, runner = _core(), DllmRunner({MODEL: model})
    core.admit(_request(tokenizer, 0, "a", max_tokens=4, steps=2))
    core.admit(_request(tokenizer, 1, "b", max_tokens=5, steps=2))
    forward = model.network.forward_packed

    def poisoned(input_ids, lengths, logit_rows=None):
        logits = forward(input_ids, lengths, logit_rows)
        if 1 + 5 in lengths:  # r1's sequence ("b" is one token + 5 masks) yields NaN
            logits = logits.clone()
            logits[:] = float("nan")
        return logits

    monkeypatch.setattr(model.network, "forward_packed", poisoned)
    plan = core.schedule()
    result = runner.execute(plan)
    assert result.stepped == ("r0",) and "non-finite logits" in result.errors["r1"] and result.forwards == 3


def test_a_response_ended_by_eos_finishes_before_its_last_step(tiny):
    model, tokenizer = tiny
    network, _ = build_tiny_dllm(seed=0, max_position_embeddings=64)
    with torch.no_grad():  # a model that favours EOS everywhere, so answers end early
        network.lm_head.weight[network.config.eos_token_id] *= 4
    eos_model = DllmModel(network, model.mask_id, model.stop_ids)
    core = _core()
    requests = [_request(tokenizer, i, "def g():", max_tokens=16, steps=16, alg="origin", temperature=1.0)
                for i in range(4)]
    finished = _decode_all(DllmRunner({MODEL: eos_model}), requests, core)
    done = {m.request_id: m for m in core.pop_done()}
    assert all(m.status == RequestStatus.FINISHED for m in done.values())
    assert any(m.steps_done < m.total_steps for m in done.values())
    for new in requests:
        expected = reference_decode(network, list(new.prompt_ids), new.params, eos_model.mask_id, eos_model.stop_ids)
        assert finished[new.request_id] == _response(expected, eos_model.stop_ids)


def _decode_all(runner: DllmRunner, requests: list[NewDllmRequest],
                core: StepSchedulerCore | None = None) -> dict[str, list[int]]:
    """Admit `requests` and step until the pool is empty; the response ids of each (no request may fail)."""
    core = core or _core()
    for new in requests:
        core.admit(new)
    finished = {}
    while core.pool:
        plan = core.schedule()
        result = runner.execute(plan)
        assert not result.errors
        finished.update({i: t.tolist() for i, t in result.finished.items()})
        core.postprocess(plan, result)
    return finished


def _response(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    out = []
    for token in tokens:
        if token in stop_ids:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "origin"])
def test_block_wise_requests_packed_with_others_equal_the_block_reference(tiny, alg):
    model, tokenizer = tiny
    requests = [_request(tokenizer, 0, "def f(x):", max_tokens=16, steps=8, alg=alg, block_length=4,
                         temperature=0.5),
                _request(tokenizer, 1, "import os", max_tokens=12, steps=6, alg=alg, block_length=12),
                _request(tokenizer, 2, "x = [", max_tokens=10, steps=5, alg=alg, temperature=1.0)]
    finished = _decode_all(DllmRunner({MODEL: model}), requests)
    for new in requests:
        expected = reference_decode(model.network, list(new.prompt_ids), new.params, model.mask_id, model.stop_ids)
        assert finished[new.request_id] == _response(expected, model.stop_ids)


def test_block_wise_decoding_fills_blocks_left_to_right(tiny):
    model, tokenizer = tiny
    sequence = DllmSequence(tokenizer.encode("def f():"), DecodeParams(max_tokens=12, steps=6, block_length=4),
                            model.mask_id, model.stop_ids)
    start = sequence.prompt_len
    for step in range(6):
        block = step // 2
        rows = sequence.logit_rows()
        assert sequence.block == block and rows.min() >= start + 4 * block - 1 and rows.max() <= start + 4 * block + 2
        with torch.no_grad():
            sequence.step(model.network.forward_packed(sequence.tokens, [sequence.length], logit_rows=rows))
        assert (sequence.tokens[start + 4 * (block + 1):] == model.mask_id).all()  # later blocks wait
        if step % 2:  # a block's last step unmasks what it has left
            assert (sequence.tokens[:start + 4 * (block + 1)] != model.mask_id).all()


def test_prefix_cache_reuses_the_prefix_and_refreshes_it_at_every_block(tiny, monkeypatch):
    model, tokenizer = tiny
    forward = model.network.forward_cached
    seen: list[tuple[list[int], list[int]]] = []  # (tokens computed per sequence, prefix positions reused)

    def spy(input_ids, lengths, logit_rows, prefixes, capture):
        seen.append((list(lengths), [p.length if p is not None else 0 for p in prefixes]))
        return forward(input_ids, lengths, logit_rows, prefixes, capture)

    monkeypatch.setattr(model.network, "forward_cached", spy)
    prompt = "def solve(nums):"
    cached = _request(tokenizer, 0, prompt, max_tokens=16, steps=16, block_length=8, prefix_cache=True)
    finished = _decode_all(DllmRunner({MODEL: model}), [cached])
    prompt_len = len(cached.prompt_ids)
    computed = [lengths[0] for lengths, _ in seen]
    reused = [prefix[0] for _, prefix in seen]
    # block 0: a full forward capturing the prompt's first prompt_len - 1 positions, then 7 steps on the tail
    assert computed[:8] == [prompt_len + 16] + [17] * 7 and reused[:8] == [0] + [prompt_len - 1] * 7
    # block 1: refreshed (a full forward), then the tail after prompt + block 0
    assert computed[8:] == [prompt_len + 16] + [9] * 7 and reused[8:] == [0] + [prompt_len + 7] * 7
    assert len(finished["r0"]) <= 16 and model.mask_id not in finished["r0"]
    # One step per block: every step refreshes the cache, so the answer is the exact block-wise one, packed or not.
    exact = _request(tokenizer, 2, prompt, max_tokens=16, steps=2, block_length=8, prefix_cache=True)
    plain = _request(tokenizer, 3, "import re", max_tokens=6, steps=3)
    expected = reference_decode(model.network, list(exact.prompt_ids), exact.params, model.mask_id, model.stop_ids)
    assert _decode_all(DllmRunner({MODEL: model}), [exact, plain])["r2"] == _response(expected, model.stop_ids)
