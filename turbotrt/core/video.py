"""Video frames to mp4 (H.264 through PyAV's FFmpeg), and back for checks. numpy only, no torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FPS = 16  # Wan's output frame rate


def latents_video_to_uint8(video: np.ndarray) -> np.ndarray:
    """Decoder output [3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> uint8 frames [T, H, W, 3].

    Clamp to [-1, 1], map to [0, 1], scale to 0..255 and round, as TurboDiffusion saves videos.
    """
    v = np.asarray(video, dtype=np.float32)
    if v.ndim == 5:
        if v.shape[0] != 1:
            raise ValueError(f"one video at a time; got a batch of {v.shape[0]}")
        v = v[0]
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"expected [3, T, H, W] RGB frames, got {v.shape}")
    v = (np.clip(v, -1.0, 1.0) + 1.0) / 2.0
    return np.round(v * 255.0).astype(np.uint8).transpose(1, 2, 3, 0)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = FPS, crf: int = 18) -> Path:
    """Encode uint8 frames [T, H, W, 3] as H.264 mp4, written atomically (temp file, then rename)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs at least one frame and even sizes, got {w}x{h}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps, options={"crf": str(crf)})
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file: uint8 [T, H, W, 3]."""
    import av

    with av.open(str(path)) as src:
        return np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])
