"""Prompt following of a generated toy video: is it the caption's colour, moving the caption's way?

numpy only (runs next to the torch-free runtime). The background is each frame's median colour
(the shape covers a few percent of the frame); foreground pixels are those far from it. The
video's colour is the palette colour nearest the mean foreground colour; its motion is the slope
of a line fitted to the foreground centroid over the frames that have a foreground. Shape is not
scored: at 8x spatial compression a tiny model's circles and squares are a few latent pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

from turbotrt.toy.dataset import COLOURS, DIRECTIONS, parse_caption

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground
MIN_PIXELS = 12  # fewer foreground pixels than this: the frame has no blob
MIN_TRAVEL = 8.0  # pixels the centroid must move over the clip along the caption's axis


@dataclass
class Score:
    caption: str
    colour: str | None  # the palette colour found (None: no foreground at all)
    direction: str | None  # the dominant motion found (None: the blob does not move MIN_TRAVEL)
    travel: tuple[float, float]  # centroid displacement over the clip, (x, y) pixels, +y down
    foreground: float  # mean fraction of foreground pixels per frame
    colour_ok: bool
    direction_ok: bool

    @property
    def passed(self) -> bool:
        return self.colour_ok and self.direction_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _foreground(video: np.ndarray) -> np.ndarray:
    v = video.astype(np.float32)
    bg = np.median(v.reshape(v.shape[0], -1, 3), axis=1)[:, None, None, :]
    return np.linalg.norm(v - bg, axis=-1) > FOREGROUND_DISTANCE


def score_video(video: np.ndarray, caption: str) -> Score:
    """Score uint8 frames [T, H, W, 3] against a caption of the toy set."""
    cap = parse_caption(caption)
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {video.dtype} {video.shape}")
    fg = _foreground(video)
    colour = direction = None
    travel = (0.0, 0.0)
    if fg.any():
        mean = video[fg].astype(np.float32).mean(axis=0)
        colour = min(COLOURS, key=lambda c: float(np.sum((mean - np.array(COLOURS[c])) ** 2)))
    counts = fg.sum(axis=(1, 2))
    frames = np.nonzero(counts >= MIN_PIXELS)[0]
    if len(frames) >= 2:
        ys, xs = np.mgrid[: video.shape[1], : video.shape[2]]
        cx = np.array([xs[fg[t]].mean() for t in frames])
        cy = np.array([ys[fg[t]].mean() for t in frames])
        span = video.shape[0] - 1  # slope per frame x clip length: travel over the whole clip
        travel = (float(np.polyfit(frames, cx, 1)[0] * span), float(np.polyfit(frames, cy, 1)[0] * span))
        best = max(DIRECTIONS, key=lambda d: DIRECTIONS[d][0] * travel[0] + DIRECTIONS[d][1] * travel[1])
        if DIRECTIONS[best][0] * travel[0] + DIRECTIONS[best][1] * travel[1] >= MIN_TRAVEL:
            direction = best
    return Score(str(cap), colour, direction, travel, float(fg.mean()),
                 colour == cap.colour, direction == cap.direction)


def score_grid(generate: Callable[[str, int], np.ndarray], captions: Iterable[str], seeds: Iterable[int]) -> dict:
    """Score generate(caption, seed) -> uint8 frames over every caption x seed.

    Returns the pass rate (colour and direction both right), colour and direction accuracies, and
    every video's Score as a dict.
    """
    rows = [score_video(generate(c, s), c).to_dict() | {"seed": s} for c in captions for s in seeds]
    n = max(len(rows), 1)
    return dict(
        videos=len(rows),
        pass_rate=sum(r["passed"] for r in rows) / n,
        colour_accuracy=sum(r["colour_ok"] for r in rows) / n,
        direction_accuracy=sum(r["direction_ok"] for r in rows) / n,
        rows=rows,
    )
