"""Hugging Face encoders registered next to ImageBind: ``clip`` (image), ``clap`` (audio) and
``hf-vision`` (any CLIP, SigLIP or BLIP-2/InstructBLIP vision tower, read out of its own or a
composite checkpoint, with a choice of layer, CLS and pooled/projected output).

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
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
            # Read through the strict loader: pointed at a checkpoint without these weights (a LLaVA
            # folder has no visual_projection), from_pretrained would leave them silently random.
            vc, prefixes = _vision_source(pretrained)
            if vc.get("model_type") != "clip_vision_model":
                raise ValueError(f"clip: {pretrained} holds a {vc.get('model_type')!r} vision tower, not CLIP's; "
                                 "use the 'hf-vision' encoder for it")
            vc = {k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")}
            model = load_vision_tower(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**vc)), pretrained,
                                      prefixes, "clip encoder")
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
            from anymodal.loading import refuse_pickle

            refuse_pickle(pretrained, "clap encoder")
            model, info = ClapAudioModelWithProjection.from_pretrained(str(pretrained), output_loading_info=True)
            if info["missing_keys"] or info["mismatched_keys"]:
                bad = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
                raise ValueError(f"clap encoder: {pretrained} lacks {len(bad)} weight(s) it needs (or has them in "
                                 f"another shape): {', '.join(bad[:8])}")
            try:
                fe = ClapFeatureExtractor.from_pretrained(str(pretrained), **opts.feature_extractor)
            except OSError:  # a checkpoint without preprocessor_config.json
                fe = ClapFeatureExtractor(**opts.feature_extractor)
        else:
            model = ClapAudioModelWithProjection(ClapAudioConfig.from_dict(opts.config))
            fe = ClapFeatureExtractor(**opts.feature_extractor)
        return cls(model, fe, opts, modalities).eval()


# ============================================================================ HF vision towers
# config model_type -> (transformers class, has a CLS token)
VISION_TOWERS = {
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip_vision_model": ("SiglipVisionModel", False),
    "blip_2_vision_model": ("Blip2VisionModel", True),
    "instructblip_vision_model": ("InstructBlipVisionModel", True),
}
VISION_OUTPUTS = ("tokens", "pooled", "projected")
# checkpoints whose vision tower sits inside a bigger model: model_type -> (where the tower's config is,
# key prefixes of its weights)
_VISION_SOURCES = {
    "llava": ("vision_config", ["vision_tower.", "model.vision_tower."]),
    "blip-2": ("vision_config", ["vision_model."]),
    "instructblip": ("vision_config", ["vision_model."]),
    "clip": ("vision_config", [""]),
    "siglip": ("vision_config", [""]),
}


@dataclass
class HFVisionOptions:
    """Options of the ``hf-vision`` encoder.

    ``config``: vision config kwargs with ``model_type`` (one of :data:`VISION_TOWERS`) for a random
    init; omit with ``pretrained``. ``feature_layer``: ``None`` reads the tower's
    ``last_hidden_state`` (after any final norm: BLIP-2's ``post_layernorm``); an index reads
    ``hidden_states[i]`` (LLaVA: -2); a list concatenates several layers. ``keep_cls``: keep the
    CLS token (LLaVA's "default" strategy drops it). ``output``: ``tokens`` (features per token),
    ``pooled`` (the tower's ``pooler_output``: GILL's choice) or ``projected`` (CLIP's
    ``image_embeds``). ``image_processor``: a transformers image processor's ``to_dict()``;
    default: the checkpoint's own, else CLIP-style resize and crop to the tower's image size.
    """

    config: dict[str, Any] | None = None
    feature_layer: int | list[int] | None = None
    keep_cls: bool = True
    output: str = "tokens"
    image_processor: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.output not in VISION_OUTPUTS:
            raise ValueError(f"hf-vision options.output must be one of {', '.join(VISION_OUTPUTS)}, got {self.output!r}")
        fl = self.feature_layer
        layers = fl if isinstance(fl, list) else [fl]
        if fl is not None and not (layers and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise ValueError(f"hf-vision options.feature_layer must be null, an integer or a list of integers, got {fl!r}")
        if not isinstance(self.keep_cls, bool):
            raise ValueError(f"hf-vision options.keep_cls must be true or false, got {self.keep_cls!r}")
        if self.config is not None and self.config.get("model_type") not in VISION_TOWERS:
            raise ValueError(f"hf-vision options.config.model_type must be one of {', '.join(VISION_TOWERS)}, "
                             f"got {self.config.get('model_type')!r}")


def _vision_source(pretrained: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """The vision config (a dict with model_type) and weight prefixes of a checkpoint directory or hub id."""
    from anymodal.hf_systems import read_config

    cfg = read_config(pretrained)
    kind = cfg.get("model_type")
    if kind in VISION_TOWERS:
        return cfg, [""]
    if kind in _VISION_SOURCES:
        from anymodal.hf_systems import auto_config

        key, prefixes = _VISION_SOURCES[kind]
        vc = getattr(auto_config(pretrained), key).to_dict()
        return vc, prefixes
    raise ValueError(f"hf-vision: {pretrained} is a {kind!r} checkpoint with no vision tower anymodal knows; "
                     f"expected a vision model ({', '.join(VISION_TOWERS)}) or a composite "
                     f"({', '.join(_VISION_SOURCES)})")


def _tower_key_spellings(key: str) -> list[str]:
    # Checkpoints written before transformers 5 nest CLIP/SigLIP towers one level deeper ("vision_model.").
    return [key, f"vision_model.{key}"] if not key.startswith("vision_model.") else [key, key[len("vision_model."):]]


def load_vision_tower(build: Callable[[], Any], pretrained: str | os.PathLike, prefixes: list[str], what: str) -> Any:
    """Build a vision tower and load it strictly (missing weights raise, unused ones are reported),
    its sizes checked against the weights before it is allocated."""
    from anymodal.hf_systems import build_checked

    return build_checked(build, pretrained, prefixes, what, rename=_tower_key_spellings)


@register_encoder("hf-vision")
class HFVisionEncoder(ModalityEncoder):
    """A Hugging Face vision tower (CLIP, SigLIP, BLIP-2 / InstructBLIP's EVA ViT) serving images.

    ``pretrained`` may be the tower's own checkpoint, a CLIP/SigLIP model, or a LLaVA / BLIP-2 /
    InstructBLIP checkpoint: the tower's weights are found inside it, and a missing one is an error.
    """

    type_name = "hf-vision"

    def __init__(self, model: Any, image_processor: Any, options: HFVisionOptions,
                 modalities: Sequence[Modality | str] = (Modality.IMAGE,)):
        super().__init__(_single_modality("hf-vision", modalities, Modality.IMAGE))
        kind = model.config.model_type
        self.has_cls = VISION_TOWERS[kind][1]
        if not options.keep_cls and not self.has_cls:
            raise ValueError(f"hf-vision options.keep_cls is false, but a {kind} tower has no CLS token")
        if options.output == "projected" and kind != "clip_vision_model":
            raise ValueError(f"hf-vision options.output 'projected' needs a CLIP tower (visual_projection); "
                             f"{kind} has none: use 'pooled' or 'tokens'")
        n_layers = model.config.num_hidden_layers
        fl = options.feature_layer
        for i in (fl if isinstance(fl, list) else [] if fl is None else [fl]):
            if not -(n_layers + 1) <= i <= n_layers:
                raise ValueError(f"hf-vision options.feature_layer {i} is out of range: the tower has {n_layers} "
                                 f"layers, so hidden_states has {n_layers + 1} entries")
        self.model = model
        self.image_processor = image_processor
        self.opts = options

    @property
    def _layers(self) -> list[int] | None:
        fl = self.opts.feature_layer
        return None if fl is None else (fl if isinstance(fl, list) else [fl])

    def feature_shape(self, modality: Modality | str) -> tuple[int, int]:
        self.check_modality(modality)
        cfg = self.model.config
        if self.opts.output == "projected":
            return (1, cfg.projection_dim)
        if self.opts.output == "pooled":
            return (1, cfg.hidden_size)
        n = (cfg.image_size // cfg.patch_size) ** 2 + (1 if self.has_cls and self.opts.keep_cls else 0)
        return (n, cfg.hidden_size * len(self._layers or [None]))

    def preprocess(self, modality: Modality | str, items: Sequence[Any]) -> torch.Tensor:
        self.check_modality(modality)
        if self.image_processor is None:
            return preprocess_images(items, size=self.model.config.image_size)
        from .preprocess import _check_items, load_image

        _check_items(items, "image")
        return self.image_processor([load_image(x) for x in items], return_tensors="pt")["pixel_values"].float()

    def forward(self, modality: Modality | str, inputs: torch.Tensor) -> torch.Tensor:
        self.check_modality(modality)
        s = self.model.config.image_size
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != (3, s, s):
            raise ValueError(f"hf-vision image input must be (batch, 3, {s}, {s}), got {tuple(inputs.shape)}")
        ref = next(self.model.parameters())
        layers = self._layers
        out = self.model(pixel_values=inputs.to(device=ref.device, dtype=ref.dtype),
                         output_hidden_states=layers is not None and self.opts.output == "tokens")
        if self.opts.output == "projected":
            return out.image_embeds.unsqueeze(1)
        if self.opts.output == "pooled":
            return out.pooler_output.unsqueeze(1)
        states = [out.last_hidden_state] if layers is None else [out.hidden_states[i] for i in layers]
        if not self.opts.keep_cls:
            states = [h[:, 1:] for h in states]
        return torch.cat(states, dim=-1)

    def options(self) -> dict[str, Any]:
        proc = None if self.image_processor is None else self.image_processor.to_dict()
        return {**dataclasses.asdict(self.opts), "config": _jsonable_config(self.model.config), "image_processor": proc}

    @classmethod
    def from_config(cls, options: dict[str, Any] | None, modalities: Sequence[Modality | str],
                    pretrained: str | os.PathLike | None = None) -> "HFVisionEncoder":
        """Build the tower from ``options["config"]``, or load it (strictly) from ``pretrained``."""
        import transformers

        opts = _options_from_dict(HFVisionOptions, options, "hf-vision")
        _single_modality("hf-vision", modalities, Modality.IMAGE)
        _check_source("hf-vision", opts.config, pretrained)
        vc, prefixes = (dict(opts.config), [""]) if pretrained is None else _vision_source(pretrained)
        kind = vc.pop("model_type")
        if kind not in VISION_TOWERS:
            raise ValueError(f"hf-vision: {kind!r} towers are not supported; supported: {', '.join(VISION_TOWERS)}")
        if opts.output == "projected" and kind != "clip_vision_model":
            raise ValueError(f"hf-vision options.output 'projected' needs a CLIP tower (visual_projection); "
                             f"{kind} has none: use 'pooled' or 'tokens'")
        class_name = "CLIPVisionModelWithProjection" if opts.output == "projected" else VISION_TOWERS[kind][0]
        config = transformers.AutoConfig.for_model(kind, **{k: v for k, v in vc.items() if k != "transformers_version"})
        build = functools.partial(getattr(transformers, class_name), config)
        if pretrained is None:
            model = build()
        else:  # sizes checked against the weights before the tower is allocated
            model = load_vision_tower(build, pretrained, prefixes, f"hf-vision encoder ({class_name})")
        return cls(model, _image_processor(opts.image_processor, pretrained), opts, modalities).eval()


def _image_processor(settings: dict[str, Any] | None, pretrained: str | os.PathLike | None) -> Any:
    import transformers

    if settings is not None:
        kind = settings.get("image_processor_type")
        if not kind or not hasattr(transformers, kind):
            raise ValueError(f"hf-vision options.image_processor needs a known image_processor_type, got {kind!r}")
        return getattr(transformers, kind).from_dict({k: v for k, v in settings.items() if k != "image_processor_type"})
    if pretrained is not None:
        from anymodal.hf_systems import local_dir

        d = local_dir(pretrained)
        # released folders keep it in preprocessor_config.json; transformers 5 nests it in processor_config.json
        if (d / "preprocessor_config.json").is_file() or (d / "processor_config.json").is_file():
            return transformers.AutoImageProcessor.from_pretrained(str(d))
    return None
