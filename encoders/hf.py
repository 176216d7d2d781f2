"""Hugging Face encoders registered next to ImageBind: ``clip`` (image) and ``clap`` (audio).

Each wraps a ``transformers`` model with a projection head and serves one modality:

- ``clip``: :class:`transformers.CLIPVisionModelWithProjection`. ``output="embedding"`` gives
  ``image_embeds`` as one token; ``"tokens"`` the vision tower's ``last_hidden_state``
  (CLS + patches). Images are preprocessed with :mod:`encoders.preprocess` (CLIP's
  bicubic resize, center crop and mean/std), the same steps as ``CLIPImageProcessor``.
- ``clap``: :class:`transformers.ClapAudioModelWithProjection` (loads the audio side of a
  full ``ClapModel`` checkpoint such as ``laion/clap-htsat-unfused`` too). ``"embedding"``
  gives ``audio_embeds``; ``"tokens"`` the HTSAT feature map flattened to a sequence. Audio is
  read with :mod:`encoders.preprocess` and turned into log-mels by ``ClapFeatureExtractor``,
  which is plain numpy and needs no download.

``pretrained`` is a hub id or a local directory for ``from_pretrained``; without it,
``options["config"]`` (config kwargs) builds a randomly initialised model (tests, training
from scratch). ``transformers`` is imported only when an encoder is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from anymodal.modality import Modality
from anymodal.registry import register_encoder

from .base import ModalityEncoder
from .preprocess import CLIP_MEAN, CLIP_STD, load_audio, preprocess_images, resample

OUTPUTS = ("embedding", "tokens")


def _options_from_dict(cls: type, options: dict[str, Any] | None, where: str) -> Any:
    data = dict(options or {})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where} options: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return cls(**data)


def _check_output(where: str, output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"{where} options.output must be one of {', '.join(OUTPUTS)}, got {output!r}")


def _single_modality(where: str, modalities: Sequence[Modality | str], expected: Modality) -> list[Modality]:
    parsed = [Modality.parse(m) for m in modalities]
    if parsed != [expected]:
        raise ValueError(f"the {where} encoder serves only {expected.value!r}; got modalities "
                         f"{[m.value for m in parsed]}")
    return parsed


def _check_source(where: str, config: dict[str, Any] | None, pretrained: str | os.PathLike | None) -> None:
    if (config is None) == (pretrained is None):
        raise ValueError(f"{where}: give exactly one of pretrained (hub id or local directory) or "
                         f"options.config (config kwargs for a randomly initialised model)")


def _jsonable_config(config: Any) -> dict[str, Any]:
    """An HF config as a JSON-safe dict that ``Config.from_dict`` rebuilds."""
    d = config.to_dict()
    for k, v in list(d.items()):
        if isinstance(v, torch.dtype):
            d[k] = str(v).removeprefix("torch.")
    return d


# ============================================================================ CLIP
@dataclass
class ClipOptions:
    """``config``: ``CLIPVisionConfig`` kwargs for a random init (omit with ``pretrained``)."""

    config: dict[str, Any] | None = None
    output: str = "embedding"
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def __post_init__(self) -> None:
        _check_output("clip", self.output)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise ValueError(f"clip options.{name} must be three numbers, got {v!r}")
        if any(x <= 0 for x in self.image_std):
            raise ValueError(f"clip options.image_std must be positive, got {self.image_std!r}")


@register_encoder("clip")
class ClipEncoder(ModalityEncoder):
    """A CLIP vision tower with its projection, serving images."""

    type_name = "clip"

    def __init__(self, model: Any, options: ClipOptions, modalities: Sequence[Modality | str] = (Modality.IMAGE,)):
        super().__init__(_single_modality("clip", modalities, Modality.IMAGE))
        self.model = model
        self.opts = options

    def feature_shape(self, modality: Modality | str) -> tuple[int, int]:
        self.check_modality(modality)
        cfg = self.model.config
        if self.opts.output == "embedding":
            return (1, cfg.projection_dim)
        return (1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def preprocess(self, modality: Modality | str, items: Sequence[Any]) -> torch.Tensor:
        self.check_modality(modality)
        return preprocess_images(items, size=self.model.config.image_size, mean=self.opts.image_mean, std=self.opts.image_std)

    def forward(self, modality: Modality | str, inputs: torch.Tensor) -> torch.Tensor:
        self.check_modality(modality)
        s = self.model.config.image_size
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != (3, s, s):
            raise ValueError(f"clip image input must be (batch, 3, {s}, {s}), got {tuple(inputs.shape)}")
        ref = self.model.visual_projection.weight
        out = self.model(pixel_values=inputs.to(device=ref.device, dtype=ref.dtype))
        return out.image_embeds.unsqueeze(1) if self.opts.output == "embedding" else out.last_hidden_state

    def options(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.opts), "config": _jsonable_config(self.model.config)}

    @classmethod
    def from_config(cls, options: dict[str, Any] | None, modalities: Sequence[Modality | str],
                    pretrained: str | os.PathLike | None = None) -> "ClipEncoder":
        """Load ``CLIPVisionModelWithProjection`` from ``pretrained``, or build it from ``options["config"]``."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        opts = _options_from_dict(ClipOptions, options, "clip")
        _single_modality("clip", modalities, Modality.IMAGE)
        _check_source("clip", opts.config, pretrained)
        if pretrained is not None:
            model = CLIPVisionModelWithProjection.from_pretrained(str(pretrained))
        else:
            model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(opts.config))
        return cls(model, opts, modalities).eval()


# ============================================================================ CLAP
@dataclass
class ClapOptions:
    """``config``: ``ClapAudioConfig`` kwargs; ``feature_extractor``: ``ClapFeatureExtractor`` kwargs."""

    config: dict[str, Any] | None = None
    feature_extractor: dict[str, Any] = field(default_factory=dict)  # defaults: 64 mels at 48 kHz, 10 s
    output: str = "embedding"

    def __post_init__(self) -> None:
        _check_output("clap", self.output)
        if not isinstance(self.feature_extractor, dict):
            raise ValueError(f"clap options.feature_extractor must be a mapping, got {type(self.feature_extractor).__name__}")


def _feature_extractor_kwargs(fe: Any) -> dict[str, Any]:
    """The constructor arguments of a ClapFeatureExtractor (its to_dict adds derived fields)."""
    params = set(inspect.signature(type(fe).__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in fe.to_dict().items() if k in params}


@register_encoder("clap")
class ClapEncoder(ModalityEncoder):
    """A CLAP (HTSAT) audio tower with its projection, serving audio."""

    type_name = "clap"

    def __init__(self, model: Any, feature_extractor: Any, options: ClapOptions,
                 modalities: Sequence[Modality | str] = (Modality.AUDIO,)):
        super().__init__(_single_modality("clap", modalities, Modality.AUDIO))
        cfg = model.config
        if cfg.enable_fusion:
            # Fusion needs a per-item is_longer flag beside the features; the encoder interface carries one tensor.
            raise ValueError("clap: fused CLAP models (enable_fusion=True) are not supported; use an unfused "
                             "checkpoint such as laion/clap-htsat-unfused")
        if feature_extractor.feature_size != cfg.num_mel_bins:
            raise ValueError(f"clap: feature_extractor.feature_size ({feature_extractor.feature_size}) must equal "
                             f"config.num_mel_bins ({cfg.num_mel_bins})")
        # One mel channel, as unfused models take. Inputs are cut to max_length_s before the extractor
        # (see preprocess), so its random crop never runs and preprocessing stays deterministic.
        feature_extractor.truncation = "rand_trunc"
        self.model = model
        self.feature_extractor = feature_extractor
        self.opts = options

    def feature_shape(self, modality: Modality | str) -> tuple[int, int]:
        self.check_modality(modality)
        cfg = self.model.config
        if self.opts.output == "embedding":
            return (1, cfg.projection_dim)
        stride = cfg.patch_stride if isinstance(cfg.patch_stride, (list, tuple)) else (cfg.patch_stride,) * 2
        down = 2 ** (len(cfg.depths) - 1)
        return ((cfg.spec_size // down // stride[0]) * (cfg.spec_size // down // stride[1]),
                cfg.patch_embeds_hidden_size * down)

    def preprocess(self, modality: Modality | str, items: Sequence[Any]) -> torch.Tensor:
        self.check_modality(modality)
        if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence) or not items:
            raise ValueError("clap preprocess expects a non-empty sequence of audio inputs")
        fe = self.feature_extractor
        waves = []
        for item in items:
            wave, sr = load_audio(item)
            waves.append(resample(wave, sr, fe.sampling_rate)[: fe.nb_max_samples].numpy())
        return fe(waves, sampling_rate=fe.sampling_rate, return_tensors="pt")["input_features"].float()

    def forward(self, modality: Modality | str, inputs: torch.Tensor) -> torch.Tensor:
        self.check_modality(modality)
        mels = self.model.config.num_mel_bins
        if inputs.ndim != 4 or inputs.shape[1] != 1 or inputs.shape[3] != mels:
            raise ValueError(f"clap audio input must be (batch, 1, frames, {mels}) log-mels, got {tuple(inputs.shape)}")
        ref = self.model.audio_projection.linear1.weight
        out = self.model(input_features=inputs.to(device=ref.device, dtype=ref.dtype))
        if self.opts.output == "embedding":
            return out.audio_embeds.unsqueeze(1)
        return out.last_hidden_state.flatten(2).transpose(1, 2)  # (B, C, F, T) -> (B, F*T, C)

    def options(self) -> dict[str, Any]:
        return {"config": _jsonable_config(self.model.config),
                "feature_extractor": _feature_extractor_kwargs(self.feature_extractor),
                "output": self.opts.output}

    @classmethod
    def from_config(cls, options: dict[str, Any] | None, modalities: Sequence[Modality | str],
                    pretrained: str | os.PathLike | None = None) -> "ClapEncoder":
        """Load ``ClapAudioModelWithProjection`` (+ its feature extractor) from ``pretrained``, or build from options."""
        from transformers import ClapAudioConfig, ClapAudioModelWithProjection, ClapFeatureExtractor

        opts = _options_from_dict(ClapOptions, options, "clap")
        _single_modality("clap", modalities, Modality.AUDIO)
        _check_source("clap", opts.config, pretrained)
        if pretrained is not None:
            model = ClapAudioModelWithProjection.from_pretrained(str(pretrained))
            try:
                fe = ClapFeatureExtractor.from_pretrained(str(pretrained), **opts.feature_extractor)
            except OSError:  # a checkpoint without preprocessor_config.json
                fe = ClapFeatureExtractor(**opts.feature_extractor)
        else:
            model = ClapAudioModelWithProjection(ClapAudioConfig.from_dict(opts.config))
            fe = ClapFeatureExtractor(**opts.feature_extractor)
        return cls(model, fe, opts, modalities).eval()
