"""The interface every modality generator implements.

A generator is a thin adapter around one diffusers pipeline, driven by conditioning tensors
(``prompt_embeds`` and friends) instead of text. It is built once and kept resident.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch

from anymodal.config import GeneratorConfig
from anymodal.modality import Modality


class ModalityGenerator(ABC):
    """Base class. Subclasses set ``type_name``, ``modality`` and ``settings_class``. A generator
    backed by a diffusers pipeline subclasses :class:`~anymodal.generators.DiffusersGenerator`,
    which implements all of this from a few declarations.

    ``conditioning_shapes`` names each tensor the wrapped pipeline is driven by and its
    per-sample shape ``(sequence, dim)``; output projectors are checked against it at load.
    """

    type_name: ClassVar[str]
    modality: ClassVar[Modality]
    settings_class: ClassVar[type]
    # Where the conditioning an output projector is trained to match comes from: "text" (encode_text
    # of the medium's caption) or "media" (encode_media of the target medium itself, for generators
    # conditioned on media embeddings, such as unCLIP, that text cannot reach without a prior).
    targets_from: ClassVar[str] = "text"

    def __init__(self, config: GeneratorConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def from_config(cls, config: GeneratorConfig) -> "ModalityGenerator":
        """Build from ``config.pretrained`` (hub id / local dir) or random init from ``config.components``."""

    @property
    @abstractmethod
    def conditioning_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-sample ``(sequence, dim)`` of each conditioning tensor, e.g. ``{"prompt_embeds": (77, 768)}``."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The generator's own text-encoder conditioning for ``texts`` (targets of decoder-side alignment)."""

    def encode_media(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """The conditioning that reproduces each target medium (file paths or loaded media): the
        alignment targets of a generator whose ``targets_from`` is ``"media"``."""
        raise ValueError(f"generator {self.type_name!r} takes its alignment targets from text (encode_text), "
                         "not from media")

    def unet_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's conditioning keyword arguments, built from conditioning tensors as the pipeline
        builds them, keeping their gradients: what a denoising loss through the frozen UNet feeds it."""
        raise ValueError(f"generator {self.type_name!r} has no denoising loss")

    @abstractmethod
    def render(self, conditioning: dict[str, torch.Tensor], settings: Any = None,
               rng: torch.Generator | list[torch.Generator] | None = None,
               progress: bool = False, on_step: Callable[[int, int], None] | None = None) -> list[Any]:
        """One medium per row of the conditioning tensors, in one batched call.

        ``settings`` is either this generator's ``settings_class`` object, already resolved (what
        ``AnyModalPipeline.resolve_settings`` passes), used as it is, or a dict of overrides / None,
        resolved here with :meth:`make_settings`: each path resolves once. ``rng`` (a
        ``torch.Generator``, or one per row) makes the result reproducible. ``on_step(step, total)``,
        if given, is called after each denoising step (``step`` from 1 to ``total``); an exception
        it raises stops the call. (The pipeline passes ``on_step`` only to a ``render`` that takes it.)
        """

    @abstractmethod
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the wrapped pipeline (safetensors) so that ``from_config(pretrained=directory)`` reloads it."""

    @abstractmethod
    def to(self, device: torch.device | str) -> "ModalityGenerator":
        ...

    def make_settings(self, settings: Any = None) -> Any:
        """This generator's settings: the config's defaults updated with a dict of overrides (None: the
        defaults alone); a ``settings_class`` object is returned as it is."""
        base = dict(self.config.settings)
        if settings is None:
            pass
        elif isinstance(settings, self.settings_class):
            self.check_settings(settings)
            return settings
        elif isinstance(settings, dict):
            base.update(settings)
        else:
            raise TypeError(f"settings for {self.modality.value} must be {self.settings_class.__name__} or a dict, "
                            f"got {type(settings).__name__}")
        try:
            made = self.settings_class(**base)
        except TypeError as e:
            from dataclasses import fields

            allowed = ", ".join(f.name for f in fields(self.settings_class))
            raise ValueError(f"bad {self.modality.value} settings {base!r}: {e}; allowed fields: {allowed}") from None
        self.check_settings(made)
        return made

    def check_settings(self, settings: Any) -> None:
        """Refuse settings that the settings class allows but this generator cannot run (an image
        height its model cannot make), with anymodal's own message naming the setting, before any
        work is done. Nothing by default."""
