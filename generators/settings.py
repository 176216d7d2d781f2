"""Per-modality generation settings: small dataclasses instead of suffixed keyword arguments.

Every field is checked when a settings object is made: counts are positive integers, scales and
lengths finite numbers (NaN or infinity would run and give black images or silence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anymodal.checks import positive_int, positive_number

# Upper bounds that keep a typo from allocating without limit; far above any real model's need.
MAX_STEPS = 10_000
MAX_SIDE = 8192
MAX_FRAMES = 4096
MAX_AUDIO_S = 3600.0






def _scale(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class ImageSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the generator's native size
    width: int | None = None

    def __post_init__(self) -> None:
        positive_int("image.num_inference_steps", self.num_inference_steps, limit=MAX_STEPS)
        _scale("image.guidance_scale", self.guidance_scale)
        positive_int("image.height", self.height, allow_none=True, limit=MAX_SIDE)
        positive_int("image.width", self.width, allow_none=True, limit=MAX_SIDE)


@dataclass
class AudioSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 2.5
    audio_length_s: float = 5.0

    def __post_init__(self) -> None:
        positive_int("audio.num_inference_steps", self.num_inference_steps, limit=MAX_STEPS)
        _scale("audio.guidance_scale", self.guidance_scale)
        positive_number("audio.audio_length_s", self.audio_length_s, limit=MAX_AUDIO_S)


@dataclass
class VideoSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    num_frames: int = 16
    height: int | None = None
    width: int | None = None
    fps: int = 8

    def __post_init__(self) -> None:
        positive_int("video.num_inference_steps", self.num_inference_steps, limit=MAX_STEPS)
        _scale("video.guidance_scale", self.guidance_scale)
        positive_int("video.num_frames", self.num_frames, limit=MAX_FRAMES)
        positive_int("video.height", self.height, allow_none=True, limit=MAX_SIDE)
        positive_int("video.width", self.width, allow_none=True, limit=MAX_SIDE)
        positive_int("video.fps", self.fps, limit=1000)
