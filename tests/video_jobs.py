"""Submitting a video job over HTTP and polling it until it reaches a status: shared by the Serve HTTP and
durability tests."""

from __future__ import annotations

import base64
import io
import time

import httpx

from tests.factories import noise_picture

TERMINAL = ("completed", "failed", "cancelled")


def wait(client: httpx.Client, video_id: str, until=TERMINAL, timeout: float = 120, poll_s: float = 0.05) -> dict:
    """The job once its status is in `until`; AssertionError with its last state after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/videos/{video_id}").json()
        if job["status"] in until:
            return job
        time.sleep(poll_s)
    raise AssertionError(f"{video_id} did not reach {until}: {job}")


def submit(client: httpx.Client, **body) -> dict:
    """POST /v1/videos: the new job, which must be accepted (202) and queued."""
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()


def png_bytes(seed: int, width: int = 40, height: int = 30) -> bytes:
    """`noise_picture` as a PNG file (an image-to-video job's first frame over HTTP)."""
    out = io.BytesIO()
    noise_picture(seed, width, height).save(out, format="PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    """`input_reference` in a JSON body."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
