"""Modality encoders (installed as ``anymodal.encoders``).

Importing this package registers the built-in encoder types: ``imagebind`` (our own
implementation, image/video/audio/text) and the Hugging Face ``clip`` (image) and ``clap``
(audio) encoders.
"""

from .base import ModalityEncoder
from .hf import ClapEncoder, ClipEncoder, HFVisionEncoder
from .imagebind import ImageBindEncoder, ImageBindOptions, TrunkOptions

__all__ = ["ModalityEncoder", "ImageBindEncoder", "ImageBindOptions", "TrunkOptions", "ClipEncoder", "ClapEncoder", "HFVisionEncoder"]
