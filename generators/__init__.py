"""Modality generators (installed as ``anymodal.generators``).

The built-in generator types are ``stable-diffusion`` (image), ``audioldm`` and ``audioldm2`` (audio),
``text-to-video`` and ``animatediff`` (video) and ``stable-unclip`` (image, from image embeddings),
with their random-init builders (:mod:`anymodal.generators.random_init`). Each registers itself when
its module is imported; :mod:`anymodal.builtin` declares them to the registry, which imports a
module on the first lookup of its type. The names below are imported on first use (PEP 562), so
that ``anymodal.generators.settings`` can be imported without torch or diffusers.
"""

from typing import TYPE_CHECKING

from anymodal.utils import lazy_exports

_EXPORTS = {
    "ModalityGenerator": ".base",
    "ImageSettings": ".settings", "AudioSettings": ".settings", "VideoSettings": ".settings",
    "DiffusersGenerator": ".components", "CLIPConditionedGenerator": ".components",
    "register_random_init": ".random_init",
    "StableDiffusionGenerator": ".image",
    "AudioLDMGenerator": ".audio", "AudioLDM2Generator": ".audio",
    "TextToVideoGenerator": ".video", "AnimateDiffGenerator": ".video",
    "StableUnCLIPGenerator": ".unclip", "UnCLIPImageSettings": ".unclip",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .audio import AudioLDM2Generator, AudioLDMGenerator
    from .base import ModalityGenerator
    from .components import CLIPConditionedGenerator, DiffusersGenerator
    from .image import StableDiffusionGenerator
    from .random_init import register_random_init
    from .settings import AudioSettings, ImageSettings, VideoSettings
    from .unclip import StableUnCLIPGenerator, UnCLIPImageSettings
    from .video import AnimateDiffGenerator, TextToVideoGenerator


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
