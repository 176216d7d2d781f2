"""The built-in modalities and component types, registered in one place.

Importing this module registers the image, audio and video :class:`~anymodal.modality.ModalitySpec`
and declares every built-in component type with the module that defines it; the registry imports
that module on the type's first lookup, where the type registers itself with the registry's
decorators; the specs' loaders (:mod:`anymodal.media`, :mod:`anymodal.inputs`) are imported on
their first call. So importing anymodal costs no import of torch, transformers, diffusers, numpy or
PIL. ``anymodal/__init__.py`` imports this module first, so the built-ins are known once any part
of the package is imported. The registries themselves
import none of them (they would form import cycles with every component module); third-party types
arrive through the ``anymodal.components`` entry points (:func:`anymodal.registry.load_plugins`).
"""

import importlib
from typing import Any, Callable

from anymodal.generators.settings import AudioSettings, ImageSettings, VideoSettings
from anymodal.modality import ModalitySpec, register_modality
from anymodal.registry import ENCODERS, GENERATORS, INPUT_PROJECTORS, OUTPUT_PROJECTORS


def _deferred(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on its first call: the media loaders need numpy and PIL, which
    ``import anymodal`` (and so ``anymodal --help``) has no use for."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__module__, call.__name__, call.__qualname__ = module, name, name
    return call


def _media(name: str) -> Callable[..., Any]:
    return _deferred("anymodal.media", name)


def _inputs(name: str) -> Callable[..., Any]:
    return _deferred("anymodal.inputs", name)


register_modality(ModalitySpec(
    name="image", plural="images", signal_prefix="img", suffix=".png", settings_class=ImageSettings,
    accepts="a file path, a PIL image or an HxWxC array", is_medium=_media("is_image"),
    check=_inputs("check_image"), save=_media("save_image"), keep=_media("keep_image"),
    restore=_media("restore_image"), default_signal_tokens=4,
    request_words=("draw", "paint", "sketch", "picture", "image", "photo", "show me")))
register_modality(ModalitySpec(
    name="audio", plural="audios", signal_prefix="aud", suffix=".wav", settings_class=AudioSettings,
    accepts="a file path, an Audio, an (array, sample_rate) tuple or a 1-D array", is_medium=_media("is_audio"),
    check=_inputs("check_audio"), save=_media("save_audio"), keep=_media("keep_audio"),
    restore=_media("restore_audio"), default_signal_tokens=8,
    request_words=("play", "sound", "tone", "hear", "audio")))
register_modality(ModalitySpec(
    name="video", plural="videos", signal_prefix="vid", suffix=".gif", suffixes=(".mp4",),
    settings_class=VideoSettings, accepts="a file path, a list of frames or a TxHxWxC array",
    is_medium=_media("is_video"), check=_inputs("check_video"), save=_media("save_video"), save_options=("fps",),
    keep=_media("keep_video"), restore=_media("restore_video"), default_signal_tokens=24,
    request_words=("video", "animate", "clip", "movie", "show me")))

# Each built-in component type, by the module that defines (and registers) it: the registry imports
# that module on the first lookup of the type, so listing types or printing help imports no torch.
_BUILTIN_TYPES = {
    ENCODERS: {"clip": "anymodal.encoders.hf", "clap": "anymodal.encoders.hf", "hf-vision": "anymodal.encoders.hf",
               "imagebind": "anymodal.encoders.imagebind"},
    INPUT_PROJECTORS: {"linear": "anymodal.projectors", "mlp": "anymodal.projectors", "qformer": "anymodal.projectors"},
    OUTPUT_PROJECTORS: {"transformer": "anymodal.projectors"},
    GENERATORS: {"stable-diffusion": "anymodal.generators.image", "audioldm": "anymodal.generators.audio",
                 "audioldm2": "anymodal.generators.audio", "stable-unclip": "anymodal.generators.unclip",
                 "text-to-video": "anymodal.generators.video", "animatediff": "anymodal.generators.video"},
}
for _registry, _types in _BUILTIN_TYPES.items():
    for _name, _module in _types.items():
        _registry.declare(_name, _module)
