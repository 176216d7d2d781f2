"""The built-in modalities and component types, registered in one place.

Importing this module registers the image, audio and video :class:`~anymodal.modality.ModalitySpec`
and imports every module that defines a built-in component type; each type registers itself with
the registry's decorators where it is defined. ``anymodal/__init__.py`` imports this module first,
so the built-ins are known once any part of the package is imported. The registries themselves
import none of them (they would form import cycles with every component module); third-party types
arrive through the ``anymodal.components`` entry points (:func:`anymodal.registry.load_plugins`).
"""

import anymodal.inputs as inputs
import anymodal.media as media
from anymodal.generators.settings import AudioSettings, ImageSettings, VideoSettings
from anymodal.modality import ModalitySpec, register_modality

register_modality(ModalitySpec(
    name="image", plural="images", signal_prefix="img", suffix=".png", settings_class=ImageSettings,
    accepts=media.IMAGE_ACCEPTS, is_medium=media.is_image, check=inputs.check_image, save=media.save_image,
    keep=media.keep_image, restore=media.restore_image, default_signal_tokens=4,
    request_words=("draw", "paint", "sketch", "picture", "image", "photo", "show me")))
register_modality(ModalitySpec(
    name="audio", plural="audios", signal_prefix="aud", suffix=".wav", settings_class=AudioSettings,
    accepts=media.AUDIO_ACCEPTS, is_medium=media.is_audio, check=inputs.check_audio, save=media.save_audio,
    keep=media.keep_audio, restore=media.restore_audio, default_signal_tokens=8,
    request_words=("play", "sound", "tone", "hear", "audio")))
register_modality(ModalitySpec(
    name="video", plural="videos", signal_prefix="vid", suffix=".gif", suffixes=(".mp4",),
    settings_class=VideoSettings, accepts=media.VIDEO_ACCEPTS, is_medium=media.is_video, check=inputs.check_video,
    save=media.save_video, save_options=("fps",), keep=media.keep_video, restore=media.restore_video,
    default_signal_tokens=24, request_words=("video", "animate", "clip", "movie")))

import anymodal.encoders.hf  # noqa: E402,F401  clip, clap, hf-vision
import anymodal.encoders.imagebind  # noqa: E402,F401  imagebind
import anymodal.generators.audio  # noqa: E402,F401  audioldm, audioldm2
import anymodal.generators.image  # noqa: E402,F401  stable-diffusion
import anymodal.generators.unclip  # noqa: E402,F401  stable-unclip
import anymodal.generators.video  # noqa: E402,F401  text-to-video, animatediff
import anymodal.projectors  # noqa: E402,F401  input: linear, mlp, qformer; output: transformer
