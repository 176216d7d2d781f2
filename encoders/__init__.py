"""Modality encoders (installed as ``anymodal.encoders``).

The built-in encoder types are ``imagebind`` (our own implementation, image/video/audio/text) and the
Hugging Face ``clip`` (image), ``clap`` (audio) and ``hf-vision`` encoders. Each registers itself when
its module is imported; :mod:`anymodal.builtin` declares them to the registry, which imports a module
on the first lookup of its type. The names below are imported on first use (PEP 562).
"""

from typing import TYPE_CHECKING

from anymodal.utils import lazy_exports

_EXPORTS = {
    "ModalityEncoder": ".base",
    "ClapEncoder": ".hf", "ClipEncoder": ".hf", "HFVisionEncoder": ".hf",
    "ImageBindEncoder": ".imagebind", "ImageBindOptions": ".imagebind", "TrunkOptions": ".imagebind",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .base import ModalityEncoder
    from .hf import ClapEncoder, ClipEncoder, HFVisionEncoder
    from .imagebind import ImageBindEncoder, ImageBindOptions, TrunkOptions


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
