"""The runtime adapter every diffusers-backed generator shares.

* :class:`DiffusersGenerator`: load from ``pretrained`` (optionally lazily) or build from
  ``components`` (random init, :mod:`anymodal.generators.random_init`), device moves and CPU
  offload, saving, conditioning checks, the cached negative (unconditional) embedding and the
  progress-bar switch;
* :class:`CLIPConditionedGenerator`, the prompt handling the Stable-Diffusion family shares.

A generator class declares which diffusers pipeline it wraps (``pipeline_class``), how its
conditioning shapes are read from the component configs (``shape_components`` and
``shapes_from``) and how the pipeline is called (``_run``). How to build its components at
random lives in :mod:`~anymodal.generators.random_init`, registered under its type name.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from typing import Any, Callable, ClassVar, Mapping

import torch

from anymodal.checks import check_keys
from anymodal.config import GeneratorConfig
from anymodal.utils import quiet_loading, small_local_dir, torch_dtype

from .base import ModalityGenerator
from .random_init import random_init_builder, seeded
from .shapes import component_config, cross_attention_width, prompt_length, read_component_configs


class _OncePerProcess:
    """Let a repeated diffusers warning through once: moving an fp16 pipeline to the CPU warns once
    per component (seven times for Stable Diffusion), which says nothing new after the first."""

    ONCE = ("cannot run with `cpu` device",)

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record: Any) -> bool:
        msg = record.getMessage()
        key = next((k for k in self.ONCE if k in msg), None)
        if key is None:
            return True
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _install_once_filter() -> None:
    import logging

    source = logging.getLogger("diffusers.pipelines.pipeline_utils")
    if not any(isinstance(f, _OncePerProcess) for f in source.filters):
        source.addFilter(_OncePerProcess())


_install_once_filter()


def _is_model_class(klass: type) -> bool:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return isinstance(klass, type) and issubclass(klass, (ModelMixin, PreTrainedModel))


# --------------------------------------------------------------------------- the shared adapter
class DiffusersGenerator(ModalityGenerator):
    """A :class:`ModalityGenerator` backed by one diffusers pipeline, kept resident once loaded.

    A subclass declares:

    * the class attributes ``type_name``, ``modality``, ``settings_class``, ``required_components``
      and ``optional_components`` (the keys ``components`` may give), ``shape_components``;
    * :meth:`pipeline_class`, the diffusers pipeline it wraps;
    * :meth:`shapes_from`, the conditioning shapes read from the configs of ``shape_components``;
    * :meth:`_run`, one batched call of the pipeline.

    Optional: :meth:`_encode` (text to conditioning, for ``encode_text``) and :meth:`_negative_once`
    (the unconditional conditioning for guidance; zeros unless overridden). Building from
    ``components`` uses the random-init builder registered for the type
    (:func:`~anymodal.generators.random_init.register_random_init`).
    """

    required_components: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()
    # component names whose configs determine the conditioning shapes
    shape_components: ClassVar[tuple[str, ...]]
    # modules that define component classes the pipeline's model_index.json may name (diffusers
    # resolves a component from another library only once its module is imported); imported
    # before the pipeline class is used
    component_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: GeneratorConfig, pipeline: Any = None):
        super().__init__(config)
        self._pipe = pipeline
        self._device: torch.device | None = None
        self._shapes: dict[str, tuple[int, int]] | None = None
        self._negative: dict[str, torch.Tensor] | None = None
        self._on_step: Callable[[int, int], None] | None = None  # set by render for _call_pipeline
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
        if config.pretrained is None and config.components is None:
            raise ValueError(f"generator type {config.type!r} needs generator.pretrained (a hub id or directory) or "
                             "generator.components (random init); give exactly one of them")
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
        build = random_init_builder(cls)
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
            pipeline = cls._load_pipeline_class()(**build(specs, where))
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
    def _load_pipeline_class(cls) -> type:
        for module in cls.component_modules:
            importlib.import_module(module)
        return cls.pipeline_class()

    def _load(self) -> Any:
        from anymodal.loading import library_errors

        # what diffusers and transformers raise on a hostile config or index is one line naming the folder
        with library_errors(f"cannot load generator {self.type_name!r} from {self.config.pretrained}",
                            self.config.pretrained):
            return self._load_checked()

    def _load_checked(self) -> Any:
        cls = self._load_pipeline_class()
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
                configs = {n: component_config(getattr(self._pipe, n, None)) for n in self.shape_components}
            else:
                from anymodal.loading import library_errors

                with library_errors(f"generator {self.type_name!r}: cannot read the component configs of "
                                    f"{self.config.pretrained}", self.config.pretrained):
                    configs = read_component_configs(self._load_pipeline_class(), self.config.pretrained,
                                                     self.shape_components)
                    self._shapes = self.shapes_from(configs)
                return dict(self._shapes)
            self._shapes = self.shapes_from(configs)
        return dict(self._shapes)

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

    def render(self, conditioning: dict[str, torch.Tensor], settings: Any = None,
               rng: torch.Generator | list[torch.Generator] | None = None,
               progress: bool = False, on_step: Callable[[int, int], None] | None = None) -> list[Any]:
        """One medium per row of the conditioning tensors, in one batched pipeline call.

        ``settings``: this generator's settings object, used as it is (what
        ``AnyModalPipeline.resolve_settings`` hands over), or a dict of overrides of the configured
        defaults, or None for the defaults. ``rng`` (one ``torch.Generator``, or one per row) makes
        the result reproducible. ``on_step(step, total)`` is called after each denoising step of a
        ``_run`` that calls the pipeline through :meth:`_call_pipeline`; an exception it raises
        stops the pipeline there and propagates.
        """
        if not isinstance(settings, self.settings_class):
            settings = self.make_settings(settings)
        pipe = self.pipeline
        self.check_settings(settings)  # again, now that a lazy pipeline is loaded (its checks need its configs)
        cond = self._check_conditioning(conditioning)
        pipe.set_progress_bar_config(disable=not progress)
        self._on_step = on_step
        try:
            with torch.no_grad():
                return self._run(cond, settings, rng)
        finally:
            self._on_step = None

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
        # No text encoder to embed "": zeros, the conditioning of nothing.
        return {name: torch.zeros(1, seq, dim) for name, (seq, dim) in self.conditioning_shapes.items()}

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise ValueError(f"generator {self.type_name!r} has no text path (its class defines no _encode), so it "
                         "cannot encode text")

    def _run(self, cond: dict[str, torch.Tensor], settings: Any,
             rng: torch.Generator | list[torch.Generator] | None) -> list[Any]:
        """Call the pipeline once on checked conditioning (on its device and dtype) and return the media."""
        raise NotImplementedError

    def _call_pipeline(self, **kwargs: Any) -> Any:
        """``self.pipeline(**kwargs)``, reporting each denoising step to the ``on_step`` that
        :meth:`render` was given, through whichever step callback the pipeline takes: diffusers'
        ``callback_on_step_end`` (called every step), or the older ``callback`` (called every
        ``scheduler.order`` steps, with the step's index among ``num_inference_steps``)."""
        on_step = self._on_step
        if on_step is None:
            return self.pipeline(**kwargs)
        pipe = self.pipeline
        total = int(kwargs.get("num_inference_steps") or 0)
        params = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in params:
            def step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                n = int(getattr(p, "num_timesteps", 0) or total)  # the pipeline's own count, when it keeps one
                on_step(min(i + 1, n), n)
                return {}

            return pipe(**kwargs, callback_on_step_end=step_end)
        if "callback" in params:
            return pipe(**kwargs, callback=lambda i, t, latents: on_step(min(i + 1, total), total), callback_steps=1)
        return pipe(**kwargs)  # a pipeline with no step callback reports no steps

    def __repr__(self) -> str:
        source = self.config.pretrained or "random init"
        state = "loaded" if self.is_loaded else "not loaded"
        return f"{type(self).__name__}({source!r}, {state})"


class CLIPConditionedGenerator(DiffusersGenerator):
    """Shared by the Stable-Diffusion family (SD, text-to-video, AnimateDiff): a CLIP tokenizer and
    text encoder produce ``prompt_embeds`` ``(tokenizer.model_max_length, unet.cross_attention_dim)``.

    The text encoder is optional (a pipeline driven only by projected embeddings); the tokenizer
    is required because it fixes the prompt length. Without a text encoder the unconditional
    embedding for guidance is zeros.
    """

    shape_components = ("tokenizer", "text_encoder", "unet")
    # diffusers' Stable Diffusion, AnimateDiff and text-to-video pipelines refuse other sizes
    size_multiple: ClassVar[int] = 8

    def check_settings(self, settings: Any) -> None:
        for side in ("height", "width"):
            value = getattr(settings, side, None)
            if value is not None and value % self.size_multiple:
                raise ValueError(f"{self.modality.value}.{side} must be a multiple of {self.size_multiple} for "
                                 f"generator {self.type_name!r}, got {value}")

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
            return super()._negative_once()
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
