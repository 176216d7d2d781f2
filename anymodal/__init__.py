"""anymodal: any-to-any multimodal generation."""

from .config import AnyModalConfig
from .modality import Modality

__all__ = ["AnyModalConfig", "Modality"]
__version__ = "0.1.0"
