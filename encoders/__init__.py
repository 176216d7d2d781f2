"""Modality encoders (installed as ``anymodal.encoders``)."""

from .base import ModalityEncoder

__all__ = ["ModalityEncoder"]
