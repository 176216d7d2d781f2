"""The built-in modalities and component types, registered in one place.

Importing this module registers the image, audio and video :class:`~anymodal.modality.ModalitySpec`
and declares every built-in component type with the module that defines it; the registry imports
that module on the type's first lookup, where the type registers itself with the registry's
decorators. So importing anymodal costs no import of torch, transformers or diffusers. ``anymodal/__init__.py`` imports this module first,
so the built-ins are known once any part of the package is imported. The registries themselves
import none of them (they would form import cycles with every component module); third-party types
arrive through the ``anymodal.components`` entry points (:func:`anymodal.registry.load_plugins`).
"""

import anymodal.inputs as inputs
import anymodal.media as media
from anymodal.generators.settings import AudioSettings, ImageSettings, VideoSettings
from anymodal.modality import ModalitySpec, register_modality
from anymodal.registry import ENCODERS, GENERATORS, INPUT_PROJECTORS, OUTPUT_PROJECTORS

register_modality(ModalitySpec(
    name="image", plural="images", signal_prefix="img", suffix=".png", settings_class=ImageSettings,
    accepts=media.IMAGE_ACCEPTS, is_medium=media.is_image, check=inputs.check_image, save=media.save_image,
    keep=media.keep_image, restore=media.restore_image, default_signal_tokens=4))
register_modality(ModalitySpec(
    name="audio", plural="audios", signal_prefix="aud", suffix=".wav", settings_class=AudioSettings,
    accepts=media.AUDIO_ACCEPTS, is_medium=media.is_audio, check=inputs.check_audio, save=media.save_audio,
    keep=media.keep_audio, restore=media.restore_audio, default_signal_tokens=8))
register_modality(ModalitySpec(
    name="video", plural="videos", signal_prefix="vid", suffix=".gif", suffixes=(".mp4",),
    settings_class=VideoSettings, accepts=media.VIDEO_ACCEPTS, is_medium=media.is_video, check=inputs.check_video,
    save=media.save_video, save_options=("fps",), keep=media.keep_video, restore=media.restore_video,
    default_signal_tokens=24))

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
