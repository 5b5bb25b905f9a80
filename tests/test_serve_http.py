"""The video graph on a real local Ray Serve, driven over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from ray import serve

from api.serve_configs import serve_application
from deployments.media import decode_mp4, probe_mp4
from deployments.video_ingress import app as video_api
from models.shapes.data import Attributes, all_attributes
from models.shapes.scorer import accuracy, read_video
from serve_graph.app import build_video_app
from tests.conftest import TEST_HEIGHTS
from tests.video_jobs import data_url, png_bytes, submit, wait

pytestmark = pytest.mark.serve
KEYS_ENV, ALICE, BOB = "DIT_TEST_API_KEYS", "alice-token-1", "bob-token-2"


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    return {KEYS_ENV: f"alice:{ALICE},bob:{BOB}"}


@pytest.fixture(scope="module")
def client(serve_cluster, tmp_path_factory):
    args = serve_application("video")["args"]
    args["store"]["data_dir"] = str(tmp_path_factory.mktemp("video-data"))
    args["auth"] = {"keys_env": KEYS_ENV}
    for model in args["models"]:  # scaled-down sizes keep 720p, 60-step requests quick; mochi stops at 480p
        if model["source"] == "tiny" and model["family"] != "sd3":
            model["resolution_heights"] = {k: v for k, v in TEST_HEIGHTS.items()
                                           if not (model["family"] == "mochi" and k == "720p")}
    # Rows of >= 128 tokens (e.g. 720p CogVideoX here) shard over both ranks of the group; small ones stay on one.
    args["scheduler"]["planner"]["min_shard_tokens"] = 64
    # Two requests per step so that SRPTF's choice is visible over HTTP.
    args["scheduler"]["budget"]["max_batch_size"] = 2
    args["scheduler"]["max_pool_size"] = 8  # small, so that overload is cheap to reach
    serve.run(build_video_app(args), name="video", route_prefix="/")
    with httpx.Client(base_url=serve_cluster.url, timeout=60, headers={"Authorization": f"Bearer {ALICE}"}) as c:
        yield c


def test_models_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert {name: (card["kind"], card["family"], card["experts"]) for name, card in cards.items()} == {
        "shapes-t2v": ("t2v", "wan", 1), "cogvideox-tiny": ("t2v", "cogvideox", 1), "wan-tiny": ("t2v", "wan", 1),
        "wan2.2-a14b-tiny": ("t2v", "wan", 2), "ltx-tiny": ("t2v", "ltx", 1),
        "cogvideox1.5-tiny": ("t2v", "cogvideox", 1), "cogvideox-i2v-tiny": ("i2v", "cogvideox", 1),
        "ltx-i2v-tiny": ("i2v", "ltx", 1), "hunyuanvideo15-tiny": ("t2v", "hunyuanvideo15", 1),
        "mochi-tiny": ("t2v", "mochi", 1), "sd3-tiny": ("t2i", "sd3", 1)}
    assert cards["ltx-tiny"]["size_multiple"] == 32 and cards["ltx-tiny"]["num_frames"] == [1, 9, 17]
    assert cards["mochi-tiny"]["resolutions"] == {"240p": 32, "360p": 48, "480p": 64}
    assert cards["mochi-tiny"]["num_frames"] == [1, 7, 13]
    assert cards["cogvideox-tiny"]["num_frames"] == [1, 9, 17] and cards["wan-tiny"]["num_frames"][:3] == [1, 5, 9]
    assert cards["sd3-tiny"]["max_image_side"] == 512 and cards["sd3-tiny"]["resolutions"] is None
    shapes = cards["shapes-t2v"]
    assert (shapes["resolutions"], shapes["num_frames"], shapes["aspect_ratios"]) == ({"64p": 64}, [9], ["16:9"])


def test_the_default_model_renders_what_its_prompts_say(client):
    """The README's first curl: the trained default (shapes-t2v) asked for 8 captions (every colour, shape and
    motion) at once, no model or resolution named; the scorer reads colour and direction back from the mp4s
    (over 60 captions it gets 98% / 83% of them; shape, 40%, is not learnt yet: docs/shapes_model.md)."""
    asked = all_attributes()[::8]  # 8: the pool size this fixture allows
    jobs = [submit(client, prompt=a.caption, seed=i) for i, a in enumerate(asked)]
    pairs = []
    for attributes, job in zip(asked, jobs):
        done = wait(client, job["id"])
        assert (done["status"], done["model"], done["resolution"]) == ("completed", "shapes-t2v", "64p"), done
        mp4 = client.get(f"/v1/videos/{job['id']}/content").content
        pairs.append((attributes, read_video(decode_mp4(mp4)).attributes))
    score = accuracy(pairs)
    assert score["colour"] >= 7 / 8 and score["direction"] >= 5 / 8, (score, pairs)
    square = client.post("/v1/videos", json={"prompt": "a red circle moving left", "aspect_ratio": "1:1"})
    assert square.status_code == 400 and square.json()["error"]["param"] == "aspect_ratio"


def test_mixed_concurrent_requests_complete_with_valid_mp4(client):
    asks = [
        dict(model="cogvideox-tiny", prompt="a cat", resolution="240p", num_frames=9),
        dict(model="cogvideox-tiny", prompt="a dog", resolution="360p", aspect_ratio="9:16", num_frames=17),
        dict(model="wan-tiny", prompt="the ocean", resolution="480p", num_frames=5, num_inference_steps=4),
        dict(model="mochi-tiny", prompt="a robot", resolution="240p", aspect_ratio="1:1", num_frames=7),
        dict(model="wan-tiny", prompt="a city", resolution="240p", num_frames=17, guidance_scale=1.0),
        dict(model="wan2.2-a14b-tiny", prompt="a fox", resolution="360p", num_frames=9, guidance_scale_2=2.0),
        dict(model="ltx-tiny", prompt="rain", resolution="240p", num_frames=17, fps=24),
        dict(model="cogvideox1.5-tiny", prompt="a boat", resolution="360p", num_frames=9),
    ]
    jobs = [submit(client, **a) for a in asks]
    for ask, job in zip(asks, jobs):
        done = wait(client, job["id"])
        assert done["status"] == "completed", done
        assert done["progress"]["step"] == done["progress"]["total_steps"]
        assert done["created_at"] <= done["started_at"] <= done["completed_at"]
        r = client.get(f"/v1/videos/{job['id']}/content")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.content[4:8] == b"ftyp"
        assert probe_mp4(r.content) == (ask["num_frames"], done["height"], done["width"])
    assert (jobs[1]["height"], jobs[1]["width"]) == (80, 48)  # 360p 9:16: short side 48, 48*16/9 -> 80
    stats = serve.get_deployment_handle("StepScheduler", app_name="video").stats.remote().result()
    # The two-expert model's low-noise forward has its own fit once a step of it ran (the probe times expert 0).
    assert stats["step_cost"]["wan2.2-a14b-tiny"] is not None and stats["step_cost"]["wan2.2-a14b-tiny#1"] is not None


def test_image_to_video_as_a_multipart_upload_and_as_a_data_url(client):
    """OpenAI's multipart form (fields + the image file) and a JSON data URL make the same job: same bytes. Another
    image makes another video; LTX's image-input entry serves the same image; the image is checked and refused where
    it does not apply, naming the field."""
    png = png_bytes(7)
    fields = {"model": "cogvideox-i2v-tiny", "prompt": "a cat wakes up", "seed": "5", "num_inference_steps": "3"}
    upload = client.post("/v1/videos", data=fields, files={"input_reference": ("cat.png", png, "image/png")})
    assert upload.status_code == 202, upload.text
    as_json = submit(client, model="cogvideox-i2v-tiny", prompt="a cat wakes up", seed=5, num_inference_steps=3,
                     input_reference=data_url(png))
    other = submit(client, prompt="a cat wakes up", seed=5, num_inference_steps=3,
                   input_reference=data_url(png_bytes(8)))  # no model named: the first i2v one
    videos = []
    for job in (upload.json(), as_json, other):
        done = wait(client, job["id"])
        assert (done["status"], done["model"], done["resolution"]) == ("completed", "cogvideox-i2v-tiny", "240p"), (
            done["error"])
        assert done["stages"]["encode_s"] > 0
        videos.append(client.get(f"/v1/videos/{job['id']}/content").content)
    assert probe_mp4(videos[0]) == (9, done["height"], done["width"]) and videos[0] == videos[1] != videos[2]
    ltx = wait(client, submit(client, model="ltx-i2v-tiny", prompt="a cat wakes up", seed=5, num_inference_steps=3,
                              input_reference=data_url(png))["id"])  # the image as LTX's first latent frame
    assert ltx["status"] == "completed", ltx["error"]
    assert probe_mp4(client.get(f"/v1/videos/{ltx['id']}/content").content) == (9, ltx["height"], ltx["width"])

    def refused(status: int, **body) -> str:
        r = client.post("/v1/videos", json={"prompt": "x", **body})
        assert r.status_code == status and r.json()["error"]["param"] == "input_reference", r.text
        return r.json()["error"]["message"]

    assert "cogvideox-tiny is a text-only model" in refused(400, model="cogvideox-tiny", input_reference=data_url(png))
    assert "required" in refused(400, model="cogvideox-i2v-tiny")
    assert "data URL" in refused(400, input_reference="https://example.com/cat.png")
    assert "not a readable image" in refused(400, input_reference="data:image/png;base64," + "QUJD" * 10)
    assert "each side" in refused(400, input_reference=data_url(png_bytes(0, width=8, height=8)))
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    assert "allowed: PNG, JPEG, WEBP" in refused(400, input_reference=data_url(gif.getvalue()))
    bad_form = client.post("/v1/videos", data={**fields, "num_inference_steps": "many"},
                           files={"input_reference": ("cat.png", png, "image/png")})
    assert bad_form.status_code == 400 and bad_form.json()["error"]["param"] == "num_inference_steps"
    image = {"input_reference": ("cat.png", png, "image/png")}
    cached = client.post("/v1/videos", files=image,
                         data={**fields, "cache": json.dumps({"mode": "taylorseer", "warmup_steps": 1, "interval": 2})})
    assert cached.status_code == 202, cached.text
    assert wait(client, cached.json()["id"])["computed_steps"] == 2  # steps 0 and 2; step 1 from the cache
    not_json = client.post("/v1/videos", data={**fields, "cache": "taylorseer"}, files=image)
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "cache", not_json.text


def test_mixed_requests_on_brick_rings_equal_each_alone(client):
    """4 resolutions, 2 models, different steps, submitted together == each alone; rings of 1 and 2 ranks ran.

    Sharding changes the order of the attention reductions, so decoded frames are compared to 1 level of 255.
    """
    asks = [dict(model="cogvideox-tiny", prompt="a big city", resolution="720p", num_frames=17, num_inference_steps=4),
            dict(model="cogvideox-tiny", prompt="a cat", resolution="240p", num_frames=9, num_inference_steps=3),
            dict(model="wan-tiny", prompt="waves", resolution="480p", num_frames=9, num_inference_steps=3),
            dict(model="wan-tiny", prompt="a red car", resolution="360p", num_frames=5, num_inference_steps=2)]
    asks = [dict(a, seed=100 + i) for i, a in enumerate(asks)]
    scheduler = serve.get_deployment_handle("StepScheduler", app_name="video")
    before = scheduler.stats.remote().result()["ring_sizes"]
    alone = []
    for ask in asks:
        job = submit(client, **ask)
        assert wait(client, job["id"])["status"] == "completed"
        alone.append(client.get(f"/v1/videos/{job['id']}/content").content)
    jobs = [submit(client, **ask) for ask in asks]
    together = []
    for job in jobs:
        assert wait(client, job["id"])["status"] == "completed"
        together.append(client.get(f"/v1/videos/{job['id']}/content").content)
    for a, b in zip(alone, together):
        assert np.abs(decode_mp4(a).astype(int) - decode_mp4(b)).max() <= 1
    after = scheduler.stats.remote().result()["ring_sizes"]
    assert {size for size in after if after[size] > before.get(size, 0)} == {1, 2}


def test_killed_rank_is_replaced_and_every_job_completes(client):
    """kill -9 one rank process during a run of 8 concurrent jobs: the group is rebuilt once, all 8 complete."""
    scheduler = serve.get_deployment_handle("StepScheduler", app_name="video")
    before = scheduler.stats.remote().result()
    asks = [dict(model=m, prompt=f"job {i}", resolution=r, num_frames=9, num_inference_steps=10, seed=i)
            for i, (m, r) in enumerate([(m, r) for m in ("cogvideox-tiny", "wan-tiny") for r in TEST_HEIGHTS])]
    jobs = [submit(client, **ask) for ask in asks]
    # The largest job runs last under SRPTF and longest: a 240p job can finish between two polls.
    wait(client, jobs[-1]["id"], until=("running",))
    os.kill(before["pids"][1], signal.SIGKILL)
    done = [wait(client, job["id"]) for job in jobs]
    assert [job["status"] for job in done] == ["completed"] * 8, [job["error"] for job in done]
    after = scheduler.stats.remote().result()
    assert after["group_restarts"] == before["group_restarts"] + 1
    assert after["ranks"] == 2 and set(after["pids"]).isdisjoint(before["pids"])


def test_srptf_short_request_after_long_ones_finishes_first(client):
    long_ask = dict(model="cogvideox-tiny", prompt="slow", resolution="720p", num_frames=17, num_inference_steps=60)
    a, b = submit(client, **long_ask), submit(client, **long_ask)
    wait(client, a["id"], until=("running",))
    short = submit(client, model="cogvideox-tiny", prompt="quick", resolution="240p", num_frames=1,
                   num_inference_steps=3)
    short_done = wait(client, short["id"])
    a_now, b_now = (client.get(f"/v1/videos/{j['id']}").json() for j in (a, b))
    assert short_done["status"] == "completed"
    assert a_now["status"] == "running" or b_now["status"] == "running"  # both batch slots were taken by long ones
    for j in (a, b):
        assert wait(client, j["id"])["completed_at"] > short_done["completed_at"]


def test_cancel_removes_request_and_engine_keeps_serving(client):
    job = submit(client, model="cogvideox-tiny", prompt="long", resolution="720p", num_frames=17,
                 num_inference_steps=200)
    wait(client, job["id"], until=("running",))
    r = client.delete(f"/v1/videos/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    time.sleep(0.3)
    after = client.get(f"/v1/videos/{job['id']}").json()
    assert after["status"] == "cancelled" and after["progress"]["step"] < 200
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert client.delete("/v1/videos/video_missing").status_code == 404
    other = submit(client, model="cogvideox-tiny", prompt="next", num_inference_steps=2)
    assert wait(client, other["id"])["status"] == "completed"
    # Nothing of either is left: not in the pool, not on a rank (the cancelled one was freed with `other`'s steps).
    scheduler = serve.get_deployment_handle("StepScheduler", app_name="video")
    deadline = time.time() + 60
    while (stats := scheduler.stats.remote().result())["pooled"] and time.time() < deadline:
        time.sleep(0.5)  # an earlier test's job may still be finishing
    assert stats["pooled"] == 0 and stats["held_on_ranks"] == [0, 0]


def test_same_seed_same_bytes_alone_or_batched(client):
    ask = dict(model="cogvideox-tiny", prompt="a bird", resolution="240p", num_frames=9, seed=1234,
               num_inference_steps=5)
    alone = submit(client, **ask)
    wait(client, alone["id"])
    together = [submit(client, **ask), submit(client, model="cogvideox-tiny", prompt="a bird", seed=99,
                                               num_frames=9, num_inference_steps=5)]
    wait(client, together[0]["id"]), wait(client, together[1]["id"])
    content = [client.get(f"/v1/videos/{j['id']}/content").content for j in (alone, *together)]
    assert content[0] == content[1] and content[0] != content[2]


def test_a_step_cached_job_computes_fewer_steps(client):
    """A TaylorSeer job beside an uncached one of the same seed: both complete with valid mp4s, the cached one
    reports the steps its cache computed (warm-up, then one in every interval) and renders other bytes."""
    ask = dict(model="cogvideox-tiny", prompt="a bird", resolution="240p", num_frames=9, seed=77,
               num_inference_steps=10)
    jobs = [submit(client, **ask), submit(client, **ask, cache={"mode": "taylorseer", "interval": 3})]
    done = [wait(client, j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["completed", "completed"]
    assert done[0]["computed_steps"] == 10 and done[1]["computed_steps"] == 5  # steps 0, 1, 2, 4, 7
    content = [client.get(f"/v1/videos/{j['id']}/content").content for j in jobs]
    assert all(b[4:8] == b"ftyp" for b in content) and content[0] != content[1]


def test_block_cache_jobs_skip_steps_and_keep_the_prompt(client):
    """MagCache, FirstBlockCache and TeaCache on the shapes model (MagCache's ratios and TeaCache's coefficients
    calibrated in configs/local.yaml), packed in the same steps: fewer steps run all the blocks, each video still
    shows what the prompt asks, as the uncached one of the same seed does."""
    ask = dict(prompt="a red circle moving left", seed=3)
    caches = [None, {"mode": "magcache", "threshold": 0.12}, {"mode": "first_block", "threshold": 0.2},
              {"mode": "teacache", "threshold": 0.2}]
    jobs = [submit(client, **ask, **({"cache": cache} if cache else {})) for cache in caches]
    done = [wait(client, j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["completed"] * 4
    assert [d["computed_steps"] for d in done] == [20, 12, 10, 11]
    read = [read_video(decode_mp4(client.get(f"/v1/videos/{j['id']}/content").content)).attributes for j in jobs]
    assert read == [Attributes("red", "circle", "left")] * 4


def test_overload_answers_429_and_recovers(client):
    long_ask = dict(model="cogvideox-tiny", prompt="busy", resolution="720p", num_frames=17, num_inference_steps=200)
    jobs = [submit(client, **long_ask) for _ in range(8)]
    wait(client, jobs[0]["id"], until=("running",))  # a step has run: the drain rate is measured
    r = client.post("/v1/videos", json=long_ask)
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    # Retry-After from the pool's remaining work over its measured rate, not a constant
    assert 1 <= int(r.headers["Retry-After"]) <= 3600 and "drains in about" in r.json()["error"]["message"]
    queued = [j for j in (client.get(f"/v1/videos/{job['id']}").json() for job in jobs) if j["status"] == "queued"]
    assert queued and all(j["estimated_start_seconds"] > 0 for j in queued)
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32"}).status_code == 429
    for job in jobs:
        assert client.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
    assert wait(client, submit(client, model="cogvideox-tiny", prompt="after", num_inference_steps=2)["id"])[
        "status"] == "completed"


def test_image_generation_returns_png(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red car", "size": "96x64", "n": 2, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sd3-tiny" and [d["seed"] for d in body["data"]] == [5, 6]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    assert all(im.format == "PNG" and im.size == (96, 64) for im in images)
    assert images[0].tobytes() != images[1].tobytes()


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        ("/v1/videos", {"prompt": "x", "model": "nope"}, 404, "model", "cogvideox-tiny"),
        ("/v1/videos", {"prompt": "x", "model": "sd3-tiny"}, 404, "model", "unknown video model"),
        ("/v1/videos", {"prompt": "x", "resolution": "1080p"}, 400, "resolution", "240p"),
        ("/v1/videos", {"prompt": "x", "resolution": "240p"}, 400, "resolution", "allowed: 64p"),
        ("/v1/videos", {"prompt": "x", "model": "mochi-tiny", "resolution": "720p"}, 400, "resolution", "480p"),
        ("/v1/videos", {"prompt": "x", "num_inference_steps": 201}, 400, "num_inference_steps", "le=200"),
        ("/v1/videos", {"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "ge=1"),
        ("/v1/videos", {"prompt": "x", "model": "mochi-tiny", "num_inference_steps": 1}, 400, "num_inference_steps",
         "needs 2..200"),
        ("/v1/videos", {"prompt": "x", "model": "cogvideox-tiny", "num_frames": 5}, 400, "num_frames", "1 + 8k"),
        ("/v1/videos", {"prompt": "x", "model": "wan-tiny", "num_frames": 4}, 400, "num_frames", "1 + 4k"),
        ("/v1/videos", {"prompt": "x", "model": "cogvideox-tiny", "num_frames": 25}, 400, "num_frames", "[1, 17]"),
        ("/v1/videos", {"prompt": ""}, 400, "prompt", "min_length=1"),
        ("/v1/videos", {"prompt": "   "}, 400, "prompt", "non-whitespace"),
        ("/v1/videos", {"prompt": "x" * 2001}, 400, "prompt", "1..2000"),
        ("/v1/videos", {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", "ge=0.0"),
        ("/v1/videos", {"prompt": "x", "model": "wan-tiny", "guidance_scale_2": 3}, 400, "guidance_scale_2",
         "wan-tiny has one expert"),
        ("/v1/videos", {"prompt": "x", "model": "wan2.2-a14b-tiny", "guidance_scale_2": 51}, 400, "guidance_scale_2",
         "le=50"),
        ("/v1/videos", {"prompt": "x", "colour": "red"}, 400, "colour", "Extra inputs"),
        ("/v1/videos", {"prompt": "x", "model": "mochi-tiny", "cache": {"mode": "teacache"}}, 400, "cache.mode",
         "supported: none, taylorseer"),
        ("/v1/videos", {"prompt": "x", "model": "wan-tiny", "cache": {"mode": "teacache"}}, 400,
         "cache.coefficients", "no calibrated TeaCache coefficients"),
        ("/v1/videos", {"prompt": "x", "model": "hunyuanvideo15-tiny", "cache": {"mode": "first_block"}}, 400,
         "cache.mode", "supported: none, taylorseer"),
        ("/v1/videos", {"prompt": "x", "cache": {"mode": "first_block", "max_skip_steps": 2}}, 400, "cache",
         "max_skip_steps applies to mode 'magcache' only, not 'first_block'"),
        ("/v1/videos", {"prompt": "x", "model": "mochi-tiny", "cache": {"mode": "magcache"}}, 400, "cache.mode",
         "supported: none, taylorseer"),
        ("/v1/videos", {"prompt": "x", "model": "wan2.2-a14b-tiny", "cache": {"mode": "magcache"}}, 400,
         "cache.mode", "supported: none, taylorseer"),
        ("/v1/videos", {"prompt": "x", "model": "cogvideox-tiny", "cache": {"mode": "magcache"}}, 400,
         "cache.mag_ratios", "no calibrated MagCache ratios"),
        ("/v1/videos", {"prompt": "x", "cache": {"mode": "magcache", "threshold": 0}}, 400, "cache.threshold",
         "gt=0"),
        ("/v1/videos", {"prompt": "x", "cache": {"mode": "fast"}}, 400, "cache.mode", "taylorseer"),
        ("/v1/videos", {"prompt": "x", "cache": {"mode": "taylorseer", "interval": 0}}, 400, "cache.interval",
         "ge=1"),
        ("/v1/videos", {"prompt": "x", "cache": {"mode": "none", "interval": 3}}, 400, "cache",
         "mode 'taylorseer' only"),
        ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, 400, "size", "multiple of 16"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size", "pattern"),
    ],
)
def test_bad_input_gets_documented_4xx(client, path, body, status, param, words):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_malformed_json_is_400(client):
    r = client.post("/v1/videos", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    assert client.get("/v1/videos/video_nope").status_code == 404


def test_idempotency_key_and_job_listing(client):
    ask = dict(model="cogvideox-tiny", prompt="once", num_inference_steps=2)
    older = [submit(client, **ask) for _ in range(2)]  # without a key: two jobs
    assert older[0]["id"] != older[1]["id"]
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/videos", json=ask, headers=headers)
    again = client.post("/v1/videos", json=ask, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = client.post("/v1/videos", json={**ask, "prompt": "twice"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    wait(client, first.json()["id"])
    newest = client.get("/v1/videos", params={"limit": 1}).json()
    assert newest["object"] == "list" and newest["data"][0]["id"] == first.json()["id"] and newest["has_more"]
    page = client.get("/v1/videos", params={"limit": 2, "after": newest["last_id"]}).json()
    assert [j["id"] for j in page["data"]] == [older[1]["id"], older[0]["id"]]
    assert page["data"][0]["created_at"] <= newest["data"][0]["created_at"]
    assert client.get("/v1/videos", params={"after": "video_nope"}).json()["error"]["param"] == "after"
    assert client.get("/v1/videos", params={"limit": 101}).json()["error"]["param"] == "limit"


def test_api_keys_guard_every_route_and_jobs_are_private(client):
    job = submit(client, model="cogvideox-tiny", prompt="alice's", num_inference_steps=2)
    anonymous = httpx.Client(base_url=client.base_url, timeout=60)
    bob = httpx.Client(base_url=client.base_url, timeout=60, headers={"Authorization": f"Bearer {BOB}"})
    wrong = httpx.Client(base_url=client.base_url, timeout=60, headers={"Authorization": "Bearer alice-token-2"})
    assert anonymous.get("/healthz").status_code == 200
    for c in (anonymous, wrong):
        r = c.post("/v1/videos", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401 and c.get(f"/v1/videos/{job['id']}").status_code == 401
    assert bob.get(f"/v1/videos/{job['id']}").status_code == 404  # as if it did not exist
    assert bob.delete(f"/v1/videos/{job['id']}").status_code == 404
    assert bob.get(f"/v1/videos/{job['id']}/content").status_code == 404
    assert job["id"] not in [j["id"] for j in bob.get("/v1/videos").json()["data"]]
    mine = bob.post("/v1/videos", json={"model": "cogvideox-tiny", "prompt": "bob's", "num_inference_steps": 2})
    assert mine.status_code == 202 and client.get(f"/v1/videos/{mine.json()['id']}").status_code == 404
    assert wait(client, job["id"])["status"] == "completed"


def test_events_stream_a_job_from_queued_to_completed(client):
    job = submit(client, model="cogvideox-tiny", prompt="events", num_inference_steps=6)
    events = []
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "completed" and statuses.count("completed") == 1
    steps = [e["progress"]["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 6 and len(events) >= 2
    assert client.get("/v1/videos/video_nope/events").status_code == 404


FUZZ = schemathesis.openapi.from_dict(video_api.openapi())


@FUZZ.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx(client, case):
    """schemathesis: requests generated from the app's OpenAPI schema, valid and not, on every route."""
    headers = {"Authorization": client.headers["Authorization"], **(case.headers or {})}
    response = case.call(base_url=str(client.base_url), headers=headers, timeout=120)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])


def test_after_the_fuzz_the_app_still_completes_a_job(client):
    for job in client.get("/v1/videos", params={"limit": 100}).json()["data"]:
        if job["status"] in ("queued", "running"):  # what the fuzz created may hold the pool: let it go
            client.delete(f"/v1/videos/{job['id']}")
    done = wait(client, submit(client, model="wan-tiny", prompt="after the fuzz", num_inference_steps=3)["id"])
    assert done["status"] == "completed"
    assert probe_mp4(client.get(f"/v1/videos/{done['id']}/content").content)[0] == 9
