"""mp4/png encoding: real decodable files, and the same frames always give the same bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from deployments.media import encode_mp4, encode_png, probe_mp4


def _frames(seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:48]
    base = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1)
    return np.stack([(base + 9 * t + seed) % 256 for t in range(9)]).astype(np.uint8)


def test_mp4_decodes_to_requested_frames_and_size():
    data = encode_mp4(_frames(), fps=8)
    assert data[4:8] == b"ftyp"
    assert probe_mp4(data) == (9, 32, 48)


def test_mp4_bytes_are_a_pure_function_of_the_frames():
    frames = _frames()
    first = encode_mp4(frames, fps=8)
    for _ in range(3):  # torch work on this thread once changed x264's float decisions
        torch.nn.functional.conv3d(torch.randn(1, 4, 5, 16, 16), torch.randn(8, 4, 3, 3, 3))
        assert encode_mp4(frames.copy(), fps=8) == first
    assert encode_mp4(_frames(seed=1), fps=8) != first


def test_png_round_trips_exactly():
    frame = _frames()[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(frame)))), frame)
