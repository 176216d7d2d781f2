"""Media containers and loaders shared by encoders, the pipeline, batch and sessions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .utils import atomic_path


class MediaError(ValueError):
    """A medium could not be read or is of the wrong kind. The message names the source and why."""


@dataclass
class Audio:
    """A mono waveform and its sample rate."""

    array: np.ndarray  # float32, shape (samples,)
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.array) / float(self.sample_rate)

    def save(self, path: str | os.PathLike) -> Path:
        import soundfile as sf

        path = Path(path)
        with atomic_path(path) as tmp:
            sf.write(str(tmp), np.asarray(self.array, dtype=np.float32), self.sample_rate, format="WAV")
        return path


# A video is a list of frames.
Video = list  # list[PIL.Image.Image]


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames as an animated GIF or an MP4 (MP4 needs imageio-ffmpeg), chosen by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not frames:
        raise ValueError("cannot save a video with no frames")
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]),
                           duration=int(1000 / fps), loop=0)
        elif suffix == ".mp4":
            import imageio.v3 as iio

            arr = np.stack([np.asarray(f.convert("RGB")) for f in frames])
            iio.imwrite(tmp, arr, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
        else:
            raise ValueError(f"unsupported video file type {suffix!r}; use .gif or .mp4")
    return path


def describe(item: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array{tuple(item.shape)}"
    return type(item).__name__
