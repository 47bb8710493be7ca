"""Synthetic captioned videos, drawn on the fly and deterministic from a seed (no downloads).

One shape (circle, square, triangle) in one colour moves in one direction (left, right, up, down)
on a plain dark background; its caption says exactly that: "a red circle moves right". Videos are
uint8 [T, H, W, 3] at the tiny profile (17 frames, 128x64). The start position is random (within
`ToyConfig.spread` of the middle track), so a caption names a family of videos, not one.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (24, 24, 32)

CAPTIONS: tuple[str, ...] = tuple(
    f"a {c} {s} moves {d}" for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)
)
_CAPTION = re.compile(r"^a (\w+) (\w+) moves (\w+)$")


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


def parse_caption(text: str) -> Caption:
    """The parts of a caption of the set; ValueError listing the vocabulary otherwise."""
    m = _CAPTION.match(" ".join(text.lower().split()))
    if m is None or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in DIRECTIONS:
        raise ValueError(
            f"{text!r} is not a caption of the toy set: use 'a COLOUR SHAPE moves DIRECTION' with COLOUR in "
            f"{', '.join(COLOURS)}; SHAPE in {', '.join(SHAPES)}; DIRECTION in {', '.join(DIRECTIONS)}"
        )
    return Caption(m[1], m[2], m[3])


@dataclass(frozen=True)
class ToyConfig:
    frames: int = 17
    width: int = 128
    height: int = 64
    size: int = 18  # shape's bounding box side, pixels
    travel_x: int = 56  # pixels travelled over the clip, horizontally and vertically
    travel_y: int = 26
    margin: int = 3
    # Fraction of the free start range that starts are drawn from, centred on each caption's middle
    # track. 1: anywhere; small: one track per caption, give or take a few pixels (what the 4-step toy
    # DiT is trained on: see turbotrt.toy.train).
    spread: float = 1.0


def _shape_mask(shape: str, cx: float, cy: float, size: int, h: int, w: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape centred at (cx, cy), float [h, w]."""
    # 4x supersampling per axis so edges are anti-aliased and motion is sub-pixel smooth; only the
    # shape's bounding box is sampled (rendering dominates the data pipeline's time).
    ss, r = 4, size / 2
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    out = np.zeros((h, w), dtype=np.float32)
    if x0 >= x1 or y0 >= y1:
        return out
    dx = (np.arange(x0 * ss, x1 * ss) + 0.5)[None, :] / ss - cx
    dy = (np.arange(y0 * ss, y1 * ss) + 0.5)[:, None] / ss - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":  # apex up; width grows linearly from apex to base
        frac = (dy + r) / (2 * r)
        m = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    out[y0:y1, x0:x1] = m.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def render(caption: str | Caption, rng: np.random.Generator, cfg: ToyConfig = ToyConfig()) -> np.ndarray:
    """One video of the caption, start position drawn from rng: uint8 [T, H, W, 3]."""
    cap = caption if isinstance(caption, Caption) else parse_caption(caption)
    dx, dy = DIRECTIONS[cap.direction]
    half = cfg.size / 2 + cfg.margin
    travel = np.array([dx * cfg.travel_x, dy * cfg.travel_y], dtype=np.float64)
    # The whole track stays inside the frame: start anywhere that allows it.
    lo = np.array([half, half]) - np.minimum(travel, 0)
    hi = np.array([cfg.width - half, cfg.height - half]) - np.maximum(travel, 0)
    start = lo + (0.5 + cfg.spread * (rng.random(2) - 0.5)) * (hi - lo)
    colour = np.array(COLOURS[cap.colour], dtype=np.float32)
    bg = np.array(BACKGROUND, dtype=np.float32)
    out = np.empty((cfg.frames, cfg.height, cfg.width, 3), dtype=np.uint8)
    for t in range(cfg.frames):
        cx, cy = start + travel * t / (cfg.frames - 1)
        a = _shape_mask(cap.shape, cx, cy, cfg.size, cfg.height, cfg.width)[..., None]
        out[t] = np.round(bg + (colour - bg) * a).astype(np.uint8)
    return out


class ToyVideos:
    """An endless, seeded stream of (video, caption): item i is the same for a given seed everywhere."""

    def __init__(self, seed: int = 0, cfg: ToyConfig = ToyConfig(), captions: tuple[str, ...] = CAPTIONS):
        self.seed, self.cfg, self.captions = seed, cfg, captions

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([self.seed, index])
        caption = self.captions[int(rng.integers(len(self.captions)))]
        return render(caption, rng, self.cfg), caption

    def batch(self, start: int, size: int) -> tuple[np.ndarray, list[str]]:
        """Items start..start+size-1 stacked: uint8 [B, T, H, W, 3] and their captions."""
        items = [self[i] for i in range(start, start + size)]
        return np.stack([v for v, _ in items]), [c for _, c in items]


def to_model_range(video: np.ndarray) -> np.ndarray:
    """uint8 [..., T, H, W, 3] -> float32 [..., 3, T, H, W] in [-1, 1] (the VAE's input)."""
    v = np.asarray(video, dtype=np.float32) / 127.5 - 1.0
    return np.moveaxis(v, -1, -4)
