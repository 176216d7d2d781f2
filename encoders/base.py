"""The interface every modality encoder implements.

An encoder turns raw media (paths, PIL images, arrays) into a batch of feature sequences,
``(batch, num_tokens, dim)``, for each modality it serves. ImageBind serves image, audio and
video with one model; an HF CLIP or CLAP encoder serves one modality each.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from anymodal.modality import Modality

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ModalityEncoder(nn.Module, ABC):
    """Base class. Subclasses set ``type_name`` and implement the abstract methods.

    Construction goes through :meth:`from_config` (``options`` is the architecture dict from
    YAML, ``pretrained`` an optional checkpoint) or :meth:`from_pretrained` (a directory written
    by :meth:`save_pretrained`: ``config.json`` + ``model.safetensors``).
    """

    type_name: ClassVar[str]

    def __init__(self, modalities: Sequence[Modality]):
        super().__init__()
        self.modalities = tuple(Modality.parse(m) for m in modalities)

    # -- what the pipeline needs to know
    @abstractmethod
    def feature_shape(self, modality: Modality) -> tuple[int, int]:
        """``(num_tokens, dim)`` of the features :meth:`forward` returns for one medium."""

    @abstractmethod
    def preprocess(self, modality: Modality, items: Sequence[Any]) -> torch.Tensor:
        """Load and transform raw media into one batched tensor (on CPU).

        Raises :class:`anymodal.media.MediaError` naming the item when it cannot be read.
        """

    @abstractmethod
    def forward(self, modality: Modality, inputs: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed batch to ``(batch, num_tokens, dim)`` features."""

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The architecture dict that rebuilds this encoder with :meth:`from_config`."""

    @classmethod
    @abstractmethod
    def from_config(cls, options: dict[str, Any], modalities: Sequence[Modality],
                    pretrained: str | None = None) -> "ModalityEncoder":
        """Build from an architecture dict; load ``pretrained`` weights when given."""

    # -- shared helpers
    def check_modality(self, modality: Modality | str) -> Modality:
        m = Modality.parse(modality)
        if m not in self.modalities:
            raise ValueError(f"{self.type_name} encoder serves {', '.join(x.value for x in self.modalities)}, "
                             f"not {m.value!r}")
        return m

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_model

        from anymodal.utils import atomic_path, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"type": self.type_name, "modalities": [m.value for m in self.modalities], "options": self.options()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, default=_json_default))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ModalityEncoder":
        """Load a directory written by :meth:`save_pretrained`; a missing or truncated file, or
        weights that do not cover the model, is an error naming the file."""
        from anymodal.loading import load_safetensors_into

        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
            options, modalities = meta["options"], [Modality.parse(m) for m in meta["modalities"]]
        except FileNotFoundError:
            raise FileNotFoundError(f"{cls.type_name} encoder: {directory / CONFIG_NAME} not found") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cls.type_name} encoder: {directory / CONFIG_NAME} is not a valid encoder config "
                             f"({type(e).__name__}: {e})") from None
        enc = cls.from_config(options, modalities)
        load_safetensors_into(enc, directory / WEIGHTS_NAME, f"{cls.type_name} encoder")
        return enc


def _json_default(o: Any) -> Any:
    if isinstance(o, Modality):
        return o.value
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
