"""Modality generators (installed as ``anymodal.generators``).

Importing this package registers the built-in generator types: ``stable-diffusion`` (image),
``audioldm`` and ``audioldm2`` (audio), ``text-to-video`` and ``animatediff`` (video), ``stable-unclip`` (image, from
image embeddings), and their random-init builders (:mod:`anymodal.generators.random_init`).
"""

from .base import ModalityGenerator
from .settings import AudioSettings, ImageSettings, VideoSettings
from .components import CLIPConditionedGenerator, DiffusersGenerator
from .random_init import register_random_init
from .image import StableDiffusionGenerator
from .audio import AudioLDM2Generator, AudioLDMGenerator
from .video import AnimateDiffGenerator, TextToVideoGenerator
from .unclip import StableUnCLIPGenerator, UnCLIPImageSettings

__all__ = [
    "ModalityGenerator",
    "ImageSettings",
    "AudioSettings",
    "VideoSettings",
    "DiffusersGenerator",
    "CLIPConditionedGenerator",
    "register_random_init",
    "StableDiffusionGenerator",
    "AudioLDMGenerator",
    "AudioLDM2Generator",
    "TextToVideoGenerator",
    "AnimateDiffGenerator",
    "StableUnCLIPGenerator",
    "UnCLIPImageSettings",
]
