"""anymodal: any-to-any multimodal generation.

    from anymodal import AnyModalPipeline
    pipe = AnyModalPipeline.from_pretrained()   # the shipped toy-world model
    out = pipe("draw a red circle", seed=0)

Importing the package registers the built-in modalities and declares the built-in component types
(:mod:`anymodal.builtin`) but imports no torch: the names that need it (the pipeline, the processor)
are imported on first use (PEP 562), so ``anymodal --help`` starts at once.
"""

from typing import TYPE_CHECKING

from . import builtin  # noqa: F401  registers the built-in modalities, declares the built-in component types
from .config import AnyModalConfig
from .modality import Modality
from .utils import lazy_exports
from .registry import (list_encoders, list_generators, list_input_projectors, list_output_projectors,
                       register_encoder, register_generator, register_input_projector, register_output_projector)
from anymodal.generators.settings import AudioSettings, ImageSettings, VideoSettings

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .media import Audio, MediaError
    from .pipeline import AnyModalOutput, AnyModalPipeline
    from .processor import Message

_LAZY = {"AnyModalPipeline": ".pipeline", "AnyModalOutput": ".pipeline", "Message": ".processor",
         "Audio": ".media", "MediaError": ".media"}

__all__ = [
    "AnyModalPipeline", "AnyModalOutput", "AnyModalConfig", "Message", "Modality", "Audio", "MediaError",
    "ImageSettings", "AudioSettings", "VideoSettings",
    "register_encoder", "register_input_projector", "register_output_projector", "register_generator",
    "list_encoders", "list_input_projectors", "list_output_projectors", "list_generators",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
