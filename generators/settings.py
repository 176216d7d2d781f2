"""Per-modality generation settings: small dataclasses instead of suffixed keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass

from anymodal.modality import Modality


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class ImageSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the generator's native size
    width: int | None = None

    def __post_init__(self) -> None:
        _positive("image.num_inference_steps", self.num_inference_steps)
        if self.guidance_scale < 0:
            raise ValueError(f"image.guidance_scale must be >= 0, got {self.guidance_scale!r}")
        _positive("image.height", self.height, allow_none=True)
        _positive("image.width", self.width, allow_none=True)


@dataclass
class AudioSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 2.5
    audio_length_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("audio.num_inference_steps", self.num_inference_steps)
        if self.guidance_scale < 0:
            raise ValueError(f"audio.guidance_scale must be >= 0, got {self.guidance_scale!r}")
        _positive("audio.audio_length_s", self.audio_length_s)


@dataclass
class VideoSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    num_frames: int = 16
    height: int | None = None
    width: int | None = None
    fps: int = 8

    def __post_init__(self) -> None:
        _positive("video.num_inference_steps", self.num_inference_steps)
        if self.guidance_scale < 0:
            raise ValueError(f"video.guidance_scale must be >= 0, got {self.guidance_scale!r}")
        _positive("video.num_frames", self.num_frames)
        _positive("video.height", self.height, allow_none=True)
        _positive("video.width", self.width, allow_none=True)
        _positive("video.fps", self.fps)


SETTINGS_CLASSES: dict[Modality, type] = {
    Modality.IMAGE: ImageSettings,
    Modality.AUDIO: AudioSettings,
    Modality.VIDEO: VideoSettings,
}
