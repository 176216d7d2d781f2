"""How to add a modality: "depth", a 2-D map of distances saved as ``.npy``.

One :class:`~anymodal.modality.ModalitySpec`, one encoder type and one generator type, registered
when this module is imported (a plugin would do it from its ``anymodal.components`` entry point);
no file of anymodal is touched. ``tests/test_add_modality.py`` runs this module end to end (the pipeline, the
CLI's output writer, a chat session saved and reloaded, a batch row). Nothing here is trained: the
encoder and the generator are tiny random modules, to show the wiring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from anymodal.checks import positive_int
from anymodal.config import GeneratorConfig
from anymodal.encoders.base import ModalityEncoder
from anymodal.generators.base import ModalityGenerator
from anymodal.media import MediaError
from anymodal.modality import Modality, ModalitySpec, register_modality
from anymodal.registry import register_encoder, register_generator
from anymodal.utils import atomic_path

SIDE = 8  # the encoder reads every depth map at 8 x 8


# ----------------------------------------------------------------------------- 1. the spec
@dataclass
class DepthSettings:
    """Generation settings of a depth map."""

    size: int = 16

    def __post_init__(self) -> None:
        positive_int("depth.size", self.size, limit=4096)


def is_depth(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) or (isinstance(x, np.ndarray) and x.ndim == 2)


def check_depth(x: Any) -> None:
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise MediaError("cannot read depth map: it holds NaN or infinite values")


def load_depth(x: Any) -> np.ndarray:
    if isinstance(x, (str, os.PathLike)):
        try:
            x = np.load(x, allow_pickle=False)  # untrusted files never unpickle
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot read depth map '{x}': {e}") from None
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise MediaError(f"cannot read depth map: expected an HxW array, got shape {getattr(x, 'shape', None)}")
    return x.astype(np.float32)


def save_depth(depth: np.ndarray, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(depth, np.float32), allow_pickle=False)
    return path


DEPTH = ModalitySpec(
    name="depth", plural="depths", signal_prefix="dep", suffix=".npy", settings_class=DepthSettings,
    accepts="a .npy file path or an HxW float array", is_medium=is_depth, check=check_depth, save=save_depth,
    keep=lambda depth, stem: save_depth(depth, stem.with_suffix(".npy")), restore=load_depth,
    default_signal_tokens=2)
DEPTH_KEY = register_modality(DEPTH)  # also Modality.DEPTH from here on


# ----------------------------------------------------------------------------- 2. an encoder
@register_encoder("depth-grid")
class DepthEncoder(ModalityEncoder):
    """Resizes a depth map to 8 x 8 and embeds it as one feature vector."""

    type_name = "depth-grid"

    def __init__(self, modalities: Sequence[Modality], dim: int = 16):
        super().__init__(modalities)
        self.dim = dim
        self.proj = nn.Linear(SIDE * SIDE, dim)

    def feature_shape(self, modality: Modality) -> tuple[int, int]:
        return (1, self.dim)

    def preprocess(self, modality: Modality, items: Sequence[Any]) -> torch.Tensor:
        self.check_modality(modality)
        maps = [torch.from_numpy(load_depth(x))[None, None] for x in items]
        return torch.cat([nn.functional.interpolate(m, size=(SIDE, SIDE), mode="bilinear") for m in maps]).flatten(1)

    def forward(self, modality: Modality, inputs: torch.Tensor) -> torch.Tensor:
        return self.proj(inputs)[:, None]

    def options(self) -> dict[str, Any]:
        return {"dim": self.dim}

    @classmethod
    def from_config(cls, options: dict[str, Any], modalities: Sequence[Modality],
                    pretrained: str | None = None) -> "DepthEncoder":
        return cls(modalities, **options)


# ----------------------------------------------------------------------------- 3. a generator
@register_generator("depth-plane")
class DepthPlaneGenerator(ModalityGenerator):
    """Draws a tilted plane ``a*x + b*y + c`` from a ``(1, 3)`` conditioning tensor."""

    type_name = "depth-plane"
    modality = DEPTH_KEY
    settings_class = DepthSettings

    @classmethod
    def from_config(cls, config: GeneratorConfig) -> "DepthPlaneGenerator":
        return cls(config)

    @property
    def conditioning_shapes(self) -> dict[str, tuple[int, int]]:
        return {"plane": (1, 3)}

    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"plane": torch.zeros(len(texts), 1, 3)}

    def render(self, conditioning, settings=None, rng=None, progress=False) -> list[np.ndarray]:
        settings = self.make_settings(settings)
        ys, xs = np.mgrid[0:1:settings.size * 1j, 0:1:settings.size * 1j]
        return [(a * xs + b * ys + c).astype(np.float32)
                for a, b, c in conditioning["plane"][:, 0].float().tolist()]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)  # nothing learned to save

    def to(self, device: torch.device | str) -> "DepthPlaneGenerator":
        return self

