"""Encode uint8 frames as mp4 (H.264 through PyAV/FFmpeg) or png (Pillow).

The API promises byte-identical output for the same seed and parameters, so the
encoder must be a pure function of the frames. x264's rate control (CRF, mb-tree),
adaptive quantisation and psy-rd make float decisions that were seen to differ
between calls in one process after torch ran on the same thread (file sizes 6944
vs 6894 bytes for the same frames). A constant quantiser with AQ and psy off has
none of them: measured identical bytes on every call.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

_X264_OPTIONS = {"qp": "16", "preset": "medium", "aq-mode": "0", "x264-params": "psy=0"}


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """frames: (F, H, W, 3) uint8 with even H and W."""
    num_frames, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=_X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base = Fraction(1, fps)
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts, video_frame.time_base = index, time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """The frames of an mp4 as (F, H, W, 3) uint8 RGB: what a client sees of a video."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def probe_mp4(data: bytes) -> tuple[int, int, int]:
    """(frame count, height, width) of an mp4, by decoding it."""
    frames = decode_mp4(data)
    return frames.shape[0], frames.shape[1], frames.shape[2]
