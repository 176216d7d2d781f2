"""Modality generators (installed as ``anymodal.generators``)."""

from .base import ModalityGenerator
from .settings import AudioSettings, ImageSettings, VideoSettings

__all__ = ["ModalityGenerator", "ImageSettings", "AudioSettings", "VideoSettings"]
