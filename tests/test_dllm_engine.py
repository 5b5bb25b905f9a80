"""Diffusion-LM requests through the step scheduler core and the dLLM runner: joining and leaving at every step,
packed with other lengths and step counts, equal to Dream's reference loop; streamed prefixes; cancel; faults."""

from __future__ import annotations

import pytest
import torch

from engine.config import BudgetConfig
from engine.dllm_runner import DllmModel, DllmRunner
from engine.engine import EngineCore, LocalExecutor
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


def _engine(max_batch_size: int = 8) -> EngineCore:
    """Steps fill the budget (batching "fill"): these tests pack requests whatever the measured step cost says."""
    return EngineCore(StepSchedulerCore(make_policy("srptf"), BudgetConfig(max_batch_size=max_batch_size),
                                        batching="fill"))


def _run(engine: EngineCore, runner: DllmRunner) -> dict[str, object]:
    """Step until the pool is empty; each request's end (status and response ids) by id."""
    executor, ended = LocalExecutor(runner), {}
    while engine.scheduler.pool:
        ended.update((end.meta.request_id, end) for end in engine.run_local(executor)[2])
    return ended


def _request(tokenizer, i: int, text: str, **params) -> NewDllmRequest:
    return NewDllmRequest(f"r{i}", MODEL, tuple(tokenizer.encode(text)), DecodeParams(seed=i, **params))


def test_requests_join_and_leave_at_every_step_and_equal_the_reference(tiny):
    model, tokenizer = tiny
    engine, executor = _engine(max_batch_size=3), LocalExecutor(DllmRunner({MODEL: model}))
    requests = [_request(tokenizer, 0, "def f(x):", max_tokens=16, steps=8, alg="entropy"),
                _request(tokenizer, 1, "import sys", max_tokens=6, steps=3, alg="maskgit_plus", temperature=0.7),
                _request(tokenizer, 2, "class A:\n    pass", max_tokens=10, steps=10, alg="origin", temperature=1.0),
                _request(tokenizer, 3, "for i in range(", max_tokens=12, steps=4, alg="topk_margin", alg_temp=0.3,
                         temperature=0.5, top_p=0.9)]
    arrivals = {0: requests[:2], 2: requests[2:3], 3: requests[3:]}  # step index -> requests admitted before it
    assert engine.admit(requests[0]).remaining_cost == 8 * (len(requests[0].prompt_ids) + 16)
    engine.admit(requests[1])
    finished, packs, prefixes = {}, [], {}
    step = 0
    while engine.scheduler.pool or step < 4:
        for new in arrivals.get(step, []) if step else []:
            engine.admit(new)
        stepped = engine.run_local(executor)
        if stepped is None:
            break
        plan, executed, ended = stepped
        packs.append(len(plan.scheduled))
        result = executed.result
        assert not result.errors and all(end.status is RequestStatus.FINISHED for end in ended)
        finished.update((end.meta.request_id, end.output) for end in ended)
        for request_id, prefix in result.prefixes.items():
            assert prefix[:len(prefixes.get(request_id, ()))] == prefixes.get(request_id, ())  # only ever grows
            prefixes[request_id] = prefix
        step += 1
    assert max(packs) == 3 and sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert not executor.runner.held  # every finished request's state left the worker
    for new in requests:
        expected = reference_decode(model.network, list(new.prompt_ids), new.params, model.mask_id, model.stop_ids)
        response = []
        for token in expected:
            if token in model.stop_ids:
                break
            response.append(token)
        assert finished[new.request_id] == tuple(response)
        assert prefixes.get(new.request_id, ()) == tuple(response)


def test_cancel_frees_the_worker_state_and_others_continue(tiny):
    model, tokenizer = tiny
    engine, runner = _engine(), DllmRunner({MODEL: model})
    engine.admit(_request(tokenizer, 0, "x = 1", max_tokens=8, steps=8))
    engine.admit(_request(tokenizer, 1, "y = 2", max_tokens=8, steps=4))
    engine.run_local(LocalExecutor(runner))
    assert set(runner.held) == {"r0", "r1"}
    [cancelled] = engine.cancel("r0")
    assert cancelled.status is RequestStatus.CANCELLED and cancelled.output is None
    engine.run_local(LocalExecutor(runner))  # the next plan frees r0 on the worker
    assert set(runner.held) == {"r1"}
    assert {i: end.status for i, end in _run(engine, runner).items()} == {"r1": RequestStatus.FINISHED}
    assert not engine.scheduler.pool and not runner.held


def test_a_request_over_the_context_fails_alone(tiny):
    model, tokenizer = tiny
    engine = _engine()
    engine.admit(_request(tokenizer, 0, "ok", max_tokens=8, steps=2))
    engine.admit(_request(tokenizer, 1, "too long", max_tokens=63, steps=2))
    done = _run(engine, DllmRunner({MODEL: model}))
    assert done["r0"].status == RequestStatus.FINISHED
    assert done["r1"].status == RequestStatus.FAILED and "exceed the model's context of 64" in done["r1"].error


def test_a_forward_fault_is_isolated_to_its_request(tiny, monkeypatch):
    model, tokenizer = tiny
    engine = _engine()
    engine.admit(_request(tokenizer, 0, "a", max_tokens=4, steps=2))
    engine.admit(_request(tokenizer, 1, "b", max_tokens=5, steps=2))
    forward = model.network.forward_packed

    def poisoned(input_ids, lengths, logit_rows=None):
        logits = forward(input_ids, lengths, logit_rows)
        if 1 + 5 in lengths:  # r1's sequence ("b" is one token + 5 masks) yields NaN
            logits = logits.clone()
            logits[:] = float("nan")
        return logits

    monkeypatch.setattr(model.network, "forward_packed", poisoned)
    _, executed, ended = engine.run_local(LocalExecutor(DllmRunner({MODEL: model})))
    result = executed.result
    assert [(end.meta.request_id, end.status) for end in ended] == [("r1", RequestStatus.FAILED)]
    assert result.stepped == ("r0",) and "non-finite logits" in result.errors["r1"] and result.forwards == 3


def test_a_response_ended_by_eos_finishes_before_its_last_step(tiny):
    model, tokenizer = tiny
    network, _ = build_tiny_dllm(seed=0, max_position_embeddings=64)
    with torch.no_grad():  # a model that favours EOS everywhere, so answers end early
        network.lm_head.weight[network.config.eos_token_id] *= 4
    eos_model = DllmModel(network, model.mask_id, model.stop_ids)
    requests = [_request(tokenizer, i, "def g():", max_tokens=16, steps=16, alg="origin", temperature=1.0)
                for i in range(4)]
    engine = _engine()
    for new in requests:
        engine.admit(new)
    done = _run(engine, DllmRunner({MODEL: eos_model}))
    assert all(end.status is RequestStatus.FINISHED for end in done.values())
    assert any(end.meta.steps_done < end.meta.total_steps for end in done.values())
    finished = {i: list(end.output) for i, end in done.items()}
    for new in requests:
        expected = reference_decode(network, list(new.prompt_ids), new.params, eos_model.mask_id, eos_model.stop_ids)
        assert finished[new.request_id] == _response(expected, eos_model.stop_ids)


def _decode_all(runner: DllmRunner, requests: list[NewDllmRequest]) -> dict[str, list[int]]:
    """Admit `requests` and step until the pool is empty; the response ids of each (every one must finish)."""
    engine = _engine()
    for new in requests:
        engine.admit(new)
    ended = _run(engine, runner)
    assert all(end.status is RequestStatus.FINISHED for end in ended.values())
    return {i: list(end.output) for i, end in ended.items()}


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
