"""The modalities anymodal knows about. A modality is a key, not a method name."""

from __future__ import annotations

from enum import Enum


class Modality(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"

    @classmethod
    def parse(cls, value: "Modality | str") -> "Modality":
        """Turn a string like ``"image"`` into a :class:`Modality`, raising a clear error otherwise."""
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; expected one of: {allowed}") from None

    def __str__(self) -> str:  # so f-strings and YAML dumps show "image", not "Modality.IMAGE"
        return self.value


MEDIA_MODALITIES = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
