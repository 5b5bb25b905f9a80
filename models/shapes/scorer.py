"""Does a video follow its prompt? A deterministic reading of colour, shape and direction from pixels.

Needs no weights: in each decoded frame the pixels far from the background (the median
of the border) form blobs; the largest is the shape, cut at half its own contrast so that
a blurred edge (a VAE's) counts as much inside as outside. Its mean colour names the
colour (nearest palette entry). Its shape: an apex-up triangle is much narrower in its top
quarter than in its bottom one (`TRIANGLE_TAPER`); otherwise the share of its bounding box
it fills tells a square from a circle (`SQUARE_FILL`). The straight line fitted to its
centroids over the clip names the direction (or "still" when it moves less than
`STILL_FRACTION` of the training travel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.shapes.data import COLOURS, MOTIONS, SPEED, Attributes

FOREGROUND_DISTANCE = 64
"""A pixel is foreground when one channel differs from the background by more than this (0-255)."""
STILL_FRACTION = 0.4
"""A track shorter than this share of the trained travel (SPEED x (frames - 1)) reads as standing still."""
SQUARE_FILL = 0.855
"""Bounding-box fill above which a symmetric blob is a square rather than a circle: half-way between the fills the
VAE's own reconstructions of rendered clips read (circles 0.755-0.82, squares 0.89-0.96 over two clips of each
caption, `docs/shapes_model.md`). Every served video passes through that VAE, which rounds a square's corners: the
half-way point of the ideal fills (1 and pi/4, 0.893) read some of its reconstructions of true squares as circles."""
TRIANGLE_TAPER = 0.6
"""Top-quarter over bottom-quarter mean width below which a blob is a triangle (a rendered one: ~0.2, a circle
or square: ~1)."""
NONE = "none"


@dataclass(frozen=True)
class Reading:
    """What the scorer saw: the attributes and the measurements behind them."""

    attributes: Attributes
    mean_rgb: tuple[float, float, float]
    fill: float
    taper: float
    displacement: tuple[float, float]
    frames_seen: int


def _largest(mask: np.ndarray) -> np.ndarray | None:
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _shape_blob(frame: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The largest blob far from the background, re-cut at half its own contrast (90th percentile)."""
    distance = np.abs(frame.astype(np.int16) - background).max(axis=-1)
    coarse = _largest(distance > FOREGROUND_DISTANCE)
    if coarse is None:
        return None
    contrast = np.percentile(distance[coarse], 90)
    return _largest((distance > 0.5 * contrast) & ndimage.binary_dilation(coarse, iterations=2))


def _taper(blob: np.ndarray) -> float:
    widths = blob.sum(axis=1)
    widths = widths[widths > 0]
    quarter = max(1, len(widths) // 4)
    return float(widths[:quarter].mean() / widths[-quarter:].mean())


def read_video(frames: np.ndarray) -> Reading:
    """Read the attributes of one clip (frames, height, width, 3) uint8."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0).astype(np.int16)
    pixels, fills, tapers, centroids, times = [], [], [], [], []
    for t, frame in enumerate(frames):
        blob = _shape_blob(frame, background)
        if blob is None or blob.sum() < 4:
            continue
        ys, xs = np.nonzero(blob)
        pixels.append(frame[blob].astype(np.float64))
        fills.append(blob.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        tapers.append(_taper(blob))
        centroids.append((xs.mean(), ys.mean()))
        times.append(t)
    if not times:
        return Reading(Attributes(NONE, NONE, NONE), (0.0, 0.0, 0.0), 0.0, 0.0, (0.0, 0.0), 0)
    mean_rgb = np.concatenate(pixels).mean(axis=0)
    colour = min(COLOURS, key=lambda name: float(np.sum((mean_rgb - np.array(COLOURS[name])) ** 2)))
    fill, taper = float(np.median(fills)), float(np.median(tapers))
    shape = "triangle" if taper < TRIANGLE_TAPER else "square" if fill > SQUARE_FILL else "circle"
    displacement = (0.0, 0.0)
    if len(times) >= 2:
        track, t = np.array(centroids), np.array(times, dtype=np.float64)
        slope = np.polyfit(t, track, 1)[0]  # pixels per frame in x and y
        displacement = (float(slope[0] * (len(frames) - 1)), float(slope[1] * (len(frames) - 1)))
    motion = _motion(displacement, len(frames)) if len(times) >= 2 else NONE
    return Reading(Attributes(colour, shape, motion), tuple(float(v) for v in mean_rgb), fill, taper, displacement,
                   len(times))


def _motion(displacement: tuple[float, float], frames: int) -> str:
    dx, dy = displacement
    if math.hypot(dx, dy) < STILL_FRACTION * SPEED * (frames - 1):
        return "still"
    return max((name for name in MOTIONS if name != "still"),
               key=lambda name: dx * MOTIONS[name][0] + dy * MOTIONS[name][1])


def accuracy(pairs: list[tuple[Attributes, Attributes]]) -> dict[str, float]:
    """Per attribute, the share of (asked, read) pairs that agree, and the share agreeing on all three."""
    if not pairs:
        raise ValueError("no videos to score")
    n = len(pairs)
    return {
        "colour": sum(a.colour == r.colour for a, r in pairs) / n,
        "shape": sum(a.shape == r.shape for a, r in pairs) / n,
        "direction": sum(a.motion == r.motion for a, r in pairs) / n,
        "all": sum(a == r for a, r in pairs) / n,
    }
