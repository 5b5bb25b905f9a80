"""Encode uint8 frames as mp4 (H.264 through PyAV/FFmpeg) or png (Pillow).

Encoding is single-threaded and writes no timestamps into the container, so the
same frames always give the same bytes (the API promises byte-identical output
for the same seed and parameters).
"""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """frames: (F, H, W, 3) uint8 with even H and W."""
    num_frames, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.options = {"crf": "18", "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def probe_mp4(data: bytes) -> tuple[int, int, int]:
    """(frame count, height, width) of an mp4, by decoding it."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].height, frames[0].width
