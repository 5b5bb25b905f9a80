"""The synthetic captioned clips the shapes model is trained on, and the captions' grammar.

A clip is one filled shape (circle, square or triangle) of one colour on a plain dark
background, either standing still or moving in a straight line in one of four directions
at a fixed speed. The caption names the three attributes: "a red circle moving left",
"a blue square standing still". The scorer reads the same three attributes back from
decoded frames, so the grammar, the palette and the geometry live here once.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}
"""Direction of travel as (dx, dy) in image coordinates (y grows downwards)."""
BACKGROUND = (24, 24, 32)
HEIGHT, WIDTH, FRAMES = 64, 112, 9
"""The clip size the model is trained for: "64p" at 16:9 (112 = 64 x 16/9 rounded to the 8-pixel multiple)."""
HALF_SIZE = 14
"""Half the side of a shape's bounding box, in pixels at HEIGHT x WIDTH: 28 pixels, 3.5 of the transformer's
8-pixel tokens, so that a square's corners are several tokens' worth of pixels (at 18 pixels, 19 of 20 generated
squares came out round; docs/shapes_model.md)."""
SPEED = 3.0
"""Pixels per frame of a moving shape: 24 pixels over a 9-frame clip."""

_CAPTION = re.compile(r"^\s*an?\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+(?:moving\s+(?P<dir>\w+)|standing\s+still)\s*$",
                      re.IGNORECASE)


@dataclass(frozen=True)
class Attributes:
    """What a caption asks for and what the scorer reads back from a video."""

    colour: str
    shape: str
    motion: str

    @property
    def caption(self) -> str:
        verb = "standing still" if self.motion == "still" else f"moving {self.motion}"
        return f"a {self.colour} {self.shape} {verb}"


def parse_caption(prompt: str) -> Attributes | None:
    """The attributes a prompt asks for, or None when it is not in the captions' grammar."""
    match = _CAPTION.match(prompt)
    if match is None:
        return None
    attributes = Attributes(match["colour"].lower(), match["shape"].lower(), (match["dir"] or "still").lower())
    known = attributes.colour in COLOURS and attributes.shape in SHAPES and attributes.motion in MOTIONS
    return attributes if known else None


def all_attributes() -> list[Attributes]:
    """Every caption of the grammar (4 colours x 3 shapes x 5 motions = 60)."""
    return [Attributes(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]


def shape_mask(shape: str, cx: float, cy: float, half: float, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of one shape centred at (cx, cy), anti-aliased by supersampling."""
    s = supersample
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex up, base down: fills half its bounding box
        inside = (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render_clip(attributes: Attributes, rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH,
                frames: int = FRAMES) -> np.ndarray:
    """One clip (frames, height, width, 3) uint8: the shape starts where its whole path stays in view."""
    dx, dy = MOTIONS[attributes.motion]
    travel = SPEED * (frames - 1)
    margin = HALF_SIZE + 2
    x_range = (margin + max(0.0, -dx * travel), width - margin - max(0.0, dx * travel))
    y_range = (margin + max(0.0, -dy * travel), height - margin - max(0.0, dy * travel))
    x0, y0 = rng.uniform(*x_range), rng.uniform(*y_range)
    colour = np.array(COLOURS[attributes.colour], dtype=np.float32)
    background = np.array(BACKGROUND, dtype=np.float32)
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        cover = shape_mask(attributes.shape, x0 + dx * SPEED * f, y0 + dy * SPEED * f, HALF_SIZE, height, width)
        clip[f] = np.round(background + cover[..., None] * (colour - background)).astype(np.uint8)
    return clip
