"""anymodal: any-to-any multimodal generation.

    from anymodal import AnyModalPipeline
    pipe = AnyModalPipeline.from_pretrained("tiny")
    out = pipe("draw a red circle", seed=0)
"""

from . import builtin  # noqa: F401  registers the built-in component types
from .config import AnyModalConfig
from .media import Audio, MediaError
from .modality import Modality
from .pipeline import AnyModalOutput, AnyModalPipeline
from .processor import Message
from .registry import (list_encoders, list_generators, list_input_projectors, list_output_projectors,
                       register_encoder, register_generator, register_input_projector, register_output_projector)
from anymodal.generators.settings import AudioSettings, ImageSettings, VideoSettings

__all__ = [
    "AnyModalPipeline", "AnyModalOutput", "AnyModalConfig", "Message", "Modality", "Audio", "MediaError",
    "ImageSettings", "AudioSettings", "VideoSettings",
    "register_encoder", "register_input_projector", "register_output_projector", "register_generator",
    "list_encoders", "list_input_projectors", "list_output_projectors", "list_generators",
]
__version__ = "0.1.0"
