"""Shared machinery of the diffusers-backed generators.

* builders that turn the plain dicts of ``GeneratorConfig.components`` into real diffusers and
  transformers components (random init, for tests and for training small generators here), with
  tokenizers built in memory so nothing is downloaded;
* :class:`DiffusersGenerator`, the lifecycle every built-in generator shares: load from
  ``pretrained`` (optionally lazily), device moves and CPU offload, saving, conditioning checks,
  the cached negative (unconditional) embedding and the progress-bar switch;
* :class:`CLIPConditionedGenerator`, the prompt handling the Stable-Diffusion family shares.

A subclass only says which diffusers pipeline it wraps, how to build that pipeline's components,
how to read its conditioning shapes from the component configs, and how to call it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import string
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch

from anymodal.config import GeneratorConfig
from anymodal.utils import quiet_loading, small_local_dir, torch_dtype
from anymodal.utils import seeded as utils_seeded

from .base import ModalityGenerator

TOKENIZER_KINDS = ("clip", "roberta", "t5")
_BYTES = "bytes"


# --------------------------------------------------------------------------- spec checking
def check_keys(where: str, spec: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming the first unknown key of ``spec`` and listing the allowed ones."""
    allowed = set(allowed)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def as_mapping(where: str, spec: Any) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a mapping of constructor arguments, got {type(spec).__name__}")
    return dict(spec)


def _init_params(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def build_with_kwargs(where: str, cls: type, spec: Any) -> Any:
    """``cls(**spec)`` (a diffusers model, a feature extractor), rejecting keys its constructor does not take."""
    spec = as_mapping(where, spec)
    check_keys(where, spec, _init_params(cls))
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build {cls.__name__}: {e}") from None


def build_transformers_config(where: str, config_cls: type, spec: Any,
                              defaults: Mapping[str, Any] | None = None, extra_keys: Iterable[str] = ()) -> Any:
    """``config_cls(**defaults, **spec)``.

    transformers configs accept any keyword and keep it as an attribute, so a typo would be
    silently ignored; the keys are checked against the config's constructor first.
    """
    spec = as_mapping(where, spec)
    check_keys(where, spec, [*_init_params(config_cls), *extra_keys])
    try:
        return config_cls(**{**(defaults or {}), **spec})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build {config_cls.__name__}: {e}") from None


def build_transformers_model(where: str, model_cls: type, config_cls: type, spec: Any,
                             defaults: Mapping[str, Any] | None = None, extra_keys: Iterable[str] = ()) -> Any:
    """``model_cls(config)`` with the config from :func:`build_transformers_config`."""
    config = build_transformers_config(where, config_cls, spec, defaults, extra_keys)
    try:
        return model_cls(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build {model_cls.__name__}: {e}") from None


def build_scheduler(where: str, spec: Any) -> Any:
    """A diffusers scheduler from ``{"class": "DDIMScheduler", **kwargs}``."""
    import diffusers
    from diffusers import SchedulerMixin

    spec = as_mapping(where, spec)
    name = spec.pop("class", None)
    known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
    if name is None:
        raise ValueError(f"{where} needs a 'class' key naming a diffusers scheduler, e.g. DDIMScheduler")
    cls = getattr(diffusers, name, None) if name in known else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{where}.class: unknown scheduler {name!r}; expected one of: {', '.join(known)}")
    return build_with_kwargs(where, cls, spec)


# --------------------------------------------------------------------------- tokenizers
def byte_tokenizer(kind: str, model_max_length: int) -> Any:
    """A tokenizer of the class a pipeline expects, with a vocabulary built in memory.

    * ``clip``: a :class:`~transformers.CLIPTokenizer` over the 256 byte-level symbols, each also
      in its end-of-word form (``a</w>``), with no merges: every UTF-8 text encodes.
    * ``roberta``: a :class:`~transformers.RobertaTokenizer` over the 256 byte-level symbols
      (what CLAP's text tower expects: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2).
    * ``t5``: a character-level :class:`~transformers.T5Tokenizer` (unigram over printable ASCII;
      anything else maps to ``<unk>``).

    Saving and reloading them through ``save_pretrained`` round-trips exactly and offline.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    if kind == "clip":
        from transformers import CLIPTokenizer

        alphabet = sorted(ByteLevel.alphabet())
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for suffix in ("", "</w>"):
            for ch in alphabet:
                vocab[ch + suffix] = len(vocab)
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    if kind == "roberta":
        from transformers import RobertaTokenizer

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for ch in sorted(ByteLevel.alphabet()):
            vocab[ch] = len(vocab)
        vocab["<mask>"] = len(vocab)
        return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    if kind == "t5":
        from transformers import T5Tokenizer

        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
        pieces += [(ch, -2.0) for ch in string.printable.strip()]
        return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")


def build_tokenizer(where: str, kind: str, spec: Any, default_max_length: int) -> Any:
    """A tokenizer from a ``components`` entry.

    ``spec`` is ``"bytes"`` (see :func:`byte_tokenizer`), ``{"type": "bytes", "model_max_length": N}``,
    or a local tokenizer directory (loaded with the pipeline's tokenizer class, e.g. OpenAI's real
    CLIP vocabulary saved once with ``save_pretrained``).
    """
    if isinstance(spec, str) and spec != _BYTES:
        import transformers

        cls = {"clip": transformers.CLIPTokenizer, "roberta": transformers.RobertaTokenizer,
               "t5": transformers.T5Tokenizer}[kind]
        if not Path(spec).is_dir():
            raise ValueError(f"{where}: expected 'bytes', a mapping, or a local tokenizer directory; "
                             f"{spec!r} is not a directory")
        return cls.from_pretrained(spec)
    spec = {"type": _BYTES} if spec == _BYTES else as_mapping(where, spec)
    check_keys(where, spec, ["type", "model_max_length"])
    if spec.get("type") != _BYTES:
        raise ValueError(f"{where}.type must be 'bytes', got {spec.get('type')!r}")
    length = spec.get("model_max_length", default_max_length)
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        raise ValueError(f"{where}.model_max_length must be an integer >= 3, got {length!r}")
    return byte_tokenizer(kind, length)


def tokenizer_token_ids(tokenizer: Any) -> dict[str, int]:
    """The special-token ids a text-encoder config should agree with, plus the vocabulary size."""
    out = {"vocab_size": len(tokenizer)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            out[name] = value
    return out


def check_vocab(where: str, model_config: Any, tokenizer: Any) -> None:
    """A text encoder whose vocabulary is smaller than its tokenizer's would index out of range."""
    size = getattr(model_config, "vocab_size", None)
    if size is not None and size < len(tokenizer):
        raise ValueError(f"{where}.vocab_size ({size}) is smaller than the tokenizer's vocabulary ({len(tokenizer)})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for a deterministic random init without disturbing the caller's RNG state."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"components.seed must be an integer, got {seed!r}")
    with utils_seeded(seed):
        yield


# --------------------------------------------------------------------------- component configs
def _frozen(config: Mapping[str, Any]) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def read_component_configs(pipeline_class: type, pretrained: str, names: Iterable[str]) -> dict[str, Any]:
    """Configs (and tokenizers) of a saved pipeline's components, without loading any weights.

    This is what lets a ``lazy`` generator report its conditioning shapes at pipeline load.
    Diffusers configs come back as ``FrozenDict`` (attribute access like ``unet.config``),
    transformers configs as ``PretrainedConfig``, tokenizers as tokenizers, missing components
    as ``None``.
    """
    import diffusers
    import transformers

    index = pipeline_class.load_config(pretrained)
    out: dict[str, Any] = {}
    for name in names:
        library, class_name = (index.get(name) or [None, None])[:2]
        if library is None or class_name is None:
            out[name] = None
        elif library == "diffusers":
            cls = getattr(diffusers, class_name)
            out[name] = _frozen(cls.load_config(pretrained, subfolder=name))
        elif library == "transformers" and "Tokenizer" in class_name:
            out[name] = getattr(transformers, class_name).from_pretrained(pretrained, subfolder=name)
        elif library == "transformers":
            out[name] = transformers.AutoConfig.from_pretrained(pretrained, subfolder=name)
        else:
            raise ValueError(f"{pretrained}: component {name!r} comes from {library!r}, which anymodal cannot read")
    return out


def prompt_length(tokenizer: Any, text_config: Any, where: str) -> int:
    """The fixed number of prompt tokens: the tokenizer's ``model_max_length`` (what the pipeline
    pads to), else the text encoder's ``max_position_embeddings``."""
    length = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    # Tokenizers saved without a limit report a huge sentinel (int(1e30)); that is not a length.
    if isinstance(length, int) and 0 < length < 1_000_000:
        return length
    length = getattr(text_config, "max_position_embeddings", None) if text_config is not None else None
    if isinstance(length, int) and length > 0:
        return length
    raise ValueError(f"{where}: cannot tell the prompt length: the pipeline has no tokenizer with a "
                     "model_max_length and no text encoder with max_position_embeddings")


def _is_model_class(klass: type) -> bool:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return isinstance(klass, type) and issubclass(klass, (ModelMixin, PreTrainedModel))


# --------------------------------------------------------------------------- the shared adapter
class DiffusersGenerator(ModalityGenerator):
    """A :class:`ModalityGenerator` backed by one diffusers pipeline, kept resident once loaded.

    Subclasses set ``required_components`` and ``optional_components`` and implement
    :meth:`pipeline_class`, :meth:`build_components`, :meth:`shapes_from`, :meth:`_encode`,
    :meth:`_negative_once` and :meth:`_run`.
    """

    required_components: ClassVar[tuple[str, ...]]
    optional_components: ClassVar[tuple[str, ...]] = ()
    # component names whose configs determine the conditioning shapes
    shape_components: ClassVar[tuple[str, ...]]

    def __init__(self, config: GeneratorConfig, pipeline: Any = None):
        super().__init__(config)
        self._pipe = pipeline
        self._device: torch.device | None = None
        self._shapes: dict[str, tuple[int, int]] | None = None
        self._negative: dict[str, torch.Tensor] | None = None
        from anymodal.loading import allow_pickle

        self._allow_pickle = allow_pickle()  # kept: a lazy generator loads later, outside the caller's block
        if pipeline is not None:
            self._setup(pipeline)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: GeneratorConfig) -> "DiffusersGenerator":
        """Build from ``config.pretrained`` (hub id or local dir) or random init from ``config.components``.

        ``config.lazy`` defers loading a pretrained pipeline until it is first needed; the
        conditioning shapes are still read at once from the saved component configs.
        """
        if config.type != cls.type_name:
            raise ValueError(f"{cls.__name__} builds generator type {cls.type_name!r}, got config.type {config.type!r}")
        if config.components is not None:
            pipeline = cls._from_components(config)
            gen = cls(config, pipeline)
        else:
            gen = cls(config)
            if not config.lazy:
                gen._ensure_loaded()
        gen.make_settings()  # a bad `settings` entry in the config fails at load, not at first use
        return gen

    @classmethod
    def _from_components(cls, config: GeneratorConfig) -> Any:
        specs = dict(config.components or {})
        seed = specs.pop("seed", 0)
        where = f"generator[{cls.type_name}].components"
        check_keys(where, specs, [*cls.required_components, *cls.optional_components, "seed"])
        missing = [k for k in cls.required_components if k not in specs]
        if missing:
            raise ValueError(f"{where}: missing required key {missing[0]!r}; required: "
                             f"{', '.join(cls.required_components)}; optional: "
                             f"{', '.join([*cls.optional_components, 'seed'])}")
        with seeded(seed), quiet_loading():  # the pipeline too: AnimateDiff builds its motion UNet in __init__
            pipeline = cls.pipeline_class()(**cls.build_components(specs, where))
        for part in pipeline.components.values():
            # Freshly constructed modules are in training mode (dropout on); from_pretrained
            # returns them in eval mode, and a random-init pipeline must behave the same.
            # (Pipelines may build modules of their own, e.g. AnimateDiff's motion UNet.)
            if isinstance(part, torch.nn.Module):
                part.eval()
        dtype = torch_dtype(config.dtype)
        # Components are built in float32; cast only when asked (a no-op cast still warns).
        return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)

    @classmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class wrapped (imported on demand: importing diffusers pipelines is slow)."""
        raise NotImplementedError

    @classmethod
    def build_components(cls, specs: dict[str, Any], where: str) -> dict[str, Any]:
        """Keyword arguments of ``pipeline_class`` built from the ``components`` dicts (already key-checked)."""
        raise NotImplementedError

    def _load(self) -> Any:
        cls = self.pipeline_class()
        index = cls.load_config(self.config.pretrained)
        # Components saved as None (no feature extractor, no safety checker) are recorded as
        # [null, null]; diffusers needs them passed again as None or it refuses to build.
        absent = {name: None for name, value in index.items()
                  if not name.startswith("_") and isinstance(value, (list, tuple)) and list(value) == [None, None]}
        from safetensors import SafetensorError

        from anymodal.loading import pickle_allowed, refuse_pickle

        where = f"generator {self.type_name!r}"
        with pickle_allowed(self._allow_pickle):
            refuse_pickle(self.config.pretrained, where)
        safetensors_only = None if self._allow_pickle else True
        try:
            with quiet_loading(show_bars=not small_local_dir(self.config.pretrained)):
                models = self._load_models(index, where, safetensors_only)
                return cls.from_pretrained(self.config.pretrained, dtype=torch_dtype(self.config.dtype),
                                           use_safetensors=safetensors_only, **absent, **models)
        except SafetensorError as e:
            raise ValueError(f"cannot load {where} from {self.config.pretrained}: a weights file is not a complete "
                             f"safetensors file ({e})") from None
        except OSError as e:
            if not os.path.isdir(self.config.pretrained):
                raise  # a hub id that cannot be fetched: the pipeline names the config field
            raise ValueError(f"cannot load {where} from {self.config.pretrained}: {str(e).strip()}") from None

    def _load_models(self, index: dict[str, Any], where: str, use_safetensors: bool | None) -> dict[str, Any]:
        """Load the pipeline's model components one by one, so that weights missing from a checkpoint
        are an error naming them rather than a random init (transformers) or a meta-tensor crash
        (diffusers); the pipeline then takes them as they are."""
        from anymodal.loading import missing_keys_error

        models = {}
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            library, class_name = value
            if library not in ("diffusers", "transformers") or not class_name:
                continue
            klass = getattr(importlib.import_module(library), class_name, None)
            if klass is None or not _is_model_class(klass):
                continue
            model, info = klass.from_pretrained(self.config.pretrained, subfolder=name, output_loading_info=True,
                                                dtype=torch_dtype(self.config.dtype), use_safetensors=use_safetensors)
            missing_keys_error(info, f"{self.config.pretrained} ({name})", where)
            models[name] = model.eval()
        return models

    def _setup(self, pipe: Any) -> None:
        if self.config.cpu_offload:
            if torch.cuda.is_available():
                pipe.enable_model_cpu_offload()
            else:
                warnings.warn(f"generator {self.type_name!r}: cpu_offload was requested but CUDA is not "
                              "available; running without offload", stacklevel=3)
        if self._device is not None and not self.config.cpu_offload:
            pipe.to(self._device)

    def _ensure_loaded(self) -> Any:
        if self._pipe is None:
            pipe = self._load()
            self._setup(pipe)
            self._pipe = pipe
        return self._pipe

    @property
    def pipeline(self) -> Any:
        """The wrapped diffusers pipeline (loads it if the generator is lazy and not loaded yet)."""
        return self._ensure_loaded()

    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    # ------------------------------------------------------------------ shapes
    @property
    def conditioning_shapes(self) -> dict[str, tuple[int, int]]:
        if self._shapes is None:
            if self._pipe is not None:
                configs = {n: self._component_config(getattr(self._pipe, n, None)) for n in self.shape_components}
            else:
                configs = read_component_configs(self.pipeline_class(), self.config.pretrained, self.shape_components)
            self._shapes = self.shapes_from(configs)
        return dict(self._shapes)

    @staticmethod
    def _component_config(component: Any) -> Any:
        # Tokenizers are used as they are; models are represented by their config.
        if component is None or not hasattr(component, "config"):
            return component
        return component.config

    @classmethod
    def shapes_from(cls, configs: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """Conditioning shapes from component configs (see :func:`read_component_configs`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own text conditioning for ``texts``, shaped like ``conditioning_shapes``."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"encode_text expects a non-empty list of strings, got {texts!r}")
        with torch.no_grad():
            return self._encode(list(texts))

    def generate(self, conditioning: dict[str, torch.Tensor], settings: Any = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress: bool = False) -> list[Any]:
        """Generate one medium per row of the conditioning tensors, in one batched pipeline call.

        ``settings`` is this modality's settings dataclass or a dict of overrides of the configured
        defaults; ``generator`` (one, or one per row) makes the result reproducible.
        """
        settings = self.make_settings(settings)
        pipe = self.pipeline
        cond = self._check_conditioning(conditioning)
        pipe.set_progress_bar_config(disable=not progress)
        with torch.no_grad():
            return self._run(cond, settings, generator)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the whole pipeline (safetensors only); ``from_config(pretrained=directory)`` reloads it."""
        self.pipeline.save_pretrained(str(directory), safe_serialization=True)

    def to(self, device: torch.device | str) -> "DiffusersGenerator":
        self._device = torch.device(device)
        self._negative = None  # cached on the old device
        if self._pipe is not None:
            if self.config.cpu_offload and torch.cuda.is_available():
                raise ValueError(f"generator {self.type_name!r} uses cpu_offload, which places its models itself; "
                                 "do not move it with .to()")
            self._pipe.to(self._device)
        return self

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def execution_device(self) -> torch.device:
        if self.config.cpu_offload or self._device is None:
            # offload hooks (or wherever the pipeline was built) decide; diffusers walks every
            # component to find out, which costs milliseconds, so only ask when we must
            return self.pipeline._execution_device
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.config.dtype)

    def _check_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check names and shapes of the conditioning tensors; return them on the pipeline's device and dtype."""
        where = f"generator {self.type_name!r}"
        shapes = self.conditioning_shapes
        if not isinstance(conditioning, Mapping):
            raise ValueError(f"{where}: conditioning must be a dict of tensors with keys "
                             f"{', '.join(shapes)}, got {type(conditioning).__name__}")
        missing = [k for k in shapes if k not in conditioning]
        if missing:
            raise ValueError(f"{where}: conditioning is missing {missing[0]!r}; expected keys: {', '.join(shapes)}")
        check_keys(f"{where} conditioning", conditioning, shapes)
        batch = None
        out = {}
        for name, (seq, dim) in shapes.items():
            value = conditioning[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where}: conditioning[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != 3 or tuple(value.shape[1:]) != (seq, dim) or value.shape[0] == 0:
                raise ValueError(f"{where}: conditioning[{name!r}] must have shape (batch, {seq}, {dim}), "
                                 f"got {tuple(value.shape)}")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{where}: conditioning tensors disagree on batch size ({batch} vs {value.shape[0]})")
            batch = value.shape[0]
            out[name] = value.detach().to(device=self.execution_device, dtype=self.dtype)
        return out

    def negative_conditioning(self, batch: int) -> dict[str, torch.Tensor]:
        """The unconditional conditioning (the text encoder's embedding of ``""``) for classifier-free
        guidance, computed once per device and expanded to ``batch`` rows."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = {k: v.to(device=self.execution_device, dtype=self.dtype)
                                  for k, v in self._negative_once().items()}
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.items()}

    def _negative_once(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _run(self, cond: dict[str, torch.Tensor], settings: Any,
             generator: torch.Generator | list[torch.Generator] | None) -> list[Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        source = self.config.pretrained or "random init"
        state = "loaded" if self.is_loaded else "not loaded"
        return f"{type(self).__name__}({source!r}, {state})"


def check_same_size(where: str, *pairs: tuple[str, Any]) -> None:
    """Raise when two configs that must agree on a width disagree (e.g. UNet vs text encoder)."""
    values = [(n, v) for n, v in pairs if v is not None]
    if len({v for _, v in values}) > 1:
        listed = ", ".join(f"{n}={v}" for n, v in values)
        raise ValueError(f"{where}: these sizes must agree: {listed}")



def cross_attention_width(unet_config: Any, where: str) -> int:
    """The UNet's cross-attention width: the ``dim`` of the ``prompt_embeds`` it attends to."""
    dim = unet_config.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        # Per-block widths only work with prompt_embeds when every block agrees.
        if len(set(dim)) != 1:
            raise ValueError(f"{where}: unet.cross_attention_dim {list(dim)} differs per block; a single "
                             "prompt_embeds tensor cannot condition it")
        dim = dim[0]
    return int(dim)


class CLIPConditionedGenerator(DiffusersGenerator):
    """Shared by the Stable-Diffusion family (SD, text-to-video, AnimateDiff): a CLIP tokenizer and
    text encoder produce ``prompt_embeds`` ``(tokenizer.model_max_length, unet.cross_attention_dim)``.

    The text encoder is optional (a pipeline driven only by projected embeddings); the tokenizer
    is required because it fixes the prompt length. Without a text encoder the unconditional
    embedding for guidance is zeros.
    """

    shape_components = ("tokenizer", "text_encoder", "unet")

    @classmethod
    def build_text_components(cls, specs: dict[str, Any], where: str) -> dict[str, Any]:
        from transformers import CLIPTextConfig, CLIPTextModel

        te_spec = specs.get("text_encoder")
        default_len = as_mapping(f"{where}.text_encoder", te_spec).get("max_position_embeddings", 77)
        tokenizer = build_tokenizer(f"{where}.tokenizer", "clip", specs["tokenizer"], default_len)
        text_encoder = None
        if te_spec is not None:
            text_encoder = build_transformers_model(f"{where}.text_encoder", CLIPTextModel, CLIPTextConfig, te_spec,
                                                    defaults=tokenizer_token_ids(tokenizer))
            check_vocab(f"{where}.text_encoder", text_encoder.config, tokenizer)
            if text_encoder.config.max_position_embeddings < tokenizer.model_max_length:
                raise ValueError(f"{where}.text_encoder.max_position_embeddings "
                                 f"({text_encoder.config.max_position_embeddings}) is smaller than the tokenizer's "
                                 f"model_max_length ({tokenizer.model_max_length})")
        return {"tokenizer": tokenizer, "text_encoder": text_encoder}

    @classmethod
    def build_denoiser_components(cls, specs: dict[str, Any], where: str, unet_class: type,
                                  **extra_classes: type) -> dict[str, Any]:
        """The random-init parts every CLIP-conditioned diffusers pipeline shares, built in this order
        (which fixes what each draws from the seed): tokenizer and text encoder, the UNet
        (``unet_class``), each of ``extra_classes`` (part name -> class, e.g. a motion adapter), the
        VAE and the scheduler. The text width is checked against the UNet's."""
        from diffusers import AutoencoderKL

        parts = cls.build_text_components(specs, where)
        parts["unet"] = build_with_kwargs(f"{where}.unet", unet_class, specs["unet"])
        for name, klass in extra_classes.items():
            parts[name] = build_with_kwargs(f"{where}.{name}", klass, specs[name])
        parts["vae"] = build_with_kwargs(f"{where}.vae", AutoencoderKL, specs["vae"])
        parts["scheduler"] = build_scheduler(f"{where}.scheduler", specs["scheduler"])
        cls.check_text_width(parts, where)
        return parts

    @classmethod
    def check_text_width(cls, parts: dict[str, Any], where: str) -> None:
        if parts.get("text_encoder") is not None:
            check_same_size(where, ("text_encoder.hidden_size", parts["text_encoder"].config.hidden_size),
                            ("unet.cross_attention_dim", cross_attention_width(parts["unet"].config, where)))

    @classmethod
    def shapes_from(cls, configs: dict[str, Any]) -> dict[str, tuple[int, int]]:
        where = f"generator {cls.type_name!r}"
        seq = prompt_length(configs.get("tokenizer"), configs.get("text_encoder"), where)
        return {"prompt_embeds": (seq, cross_attention_width(configs["unet"], where))}

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        if pipe.text_encoder is None:
            raise ValueError(f"generator {self.type_name!r} has no text encoder, so it cannot encode text")
        embeds, _ = pipe.encode_prompt(texts, self.execution_device, 1, False)
        return {"prompt_embeds": embeds}

    def _negative_once(self) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        if pipe.text_encoder is None:
            seq, dim = self.conditioning_shapes["prompt_embeds"]
            return {"prompt_embeds": torch.zeros(1, seq, dim)}
        embeds, _ = pipe.encode_prompt([""], self.execution_device, 1, False)
        return {"prompt_embeds": embeds}

    def unet_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the pipelines of this family pass prompt_embeds to the UNet as they are
        return {"encoder_hidden_states": conditioning["prompt_embeds"]}

    def prompt_kwargs(self, cond: dict[str, torch.Tensor], guidance_scale: float) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` plus, when guidance is on, the cached ``negative_prompt_embeds``."""
        kwargs = {"prompt_embeds": cond["prompt_embeds"]}
        if guidance_scale > 1.0:  # the pipelines' own test for classifier-free guidance
            batch = cond["prompt_embeds"].shape[0]
            kwargs["negative_prompt_embeds"] = self.negative_conditioning(batch)["prompt_embeds"]
        return kwargs
