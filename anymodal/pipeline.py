"""AnyModalPipeline: the public API. Load, call, save.

    pipe = AnyModalPipeline.from_pretrained("configs/tiny.yaml")
    out = pipe("draw a red circle", seed=0)
    out.text[0], out.images[0]
"""

from __future__ import annotations

import contextlib
import copy
import functools
import dataclasses
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import AnyModalConfig
from .generation import generate_text
from .loading import (check_external, check_file_fits, check_links_inside, confined, load_safetensors_into,
                      pickle_allowed, read_safetensors, refuse_pickle)
from .inputs import check_max_new_tokens, check_prompts, check_sampling, check_seed
from .media import MediaError, describe
from .modality import MediaFields, Modality, media_by_plural, media_modalities
from .lowmem import grow_token_rows
from .model import AnyModalModel, load_language_model, load_tokenizer
from .processor import AnyModalProcessor, Message
from .registry import ENCODERS, GENERATORS
from .utils import atomic_dir, atomic_write_text, check_replaceable, peft_quietly, seeded

logger = logging.getLogger(__name__)

INDEX_NAME = "anymodal_index.json"
FORMAT_VERSION = 1
# the top-level entries a saved pipeline directory may hold (what save_pretrained and the converters write)
SAVED_NAMES = (INDEX_NAME, "config.yaml", "processor", "llm", "llm_adapter", "encoders", "input_projectors",
               "output_projectors", "generators")


class AnyModalOutput(MediaFields):
    """What a call returns, one entry per prompt in every field.

    ``text[i]`` is prompt ``i``'s generated text, each generated medium marked by its placeholder
    (``<image>``...). ``media[m][i]`` lists the media of modality ``m`` generated for prompt ``i``,
    in the order of their placeholders; ``media`` holds every registered media modality. The
    fields ``images``, ``audios``, ``videos`` (and the plural of any registered modality) are views
    of ``media``.
    """

    def __init__(self, text: list[str], media: dict[Modality | str, list[list[Any]]] | None = None,
                 token_ids: list[list[int]] | None = None, warnings: list[list[str]] | None = None,
                 **by_plural: list[list[Any]]):
        self.text = list(text)
        self.token_ids = token_ids if token_ids is not None else []
        # per prompt: what went wrong without failing the call (a requested medium that never came)
        self.warnings = warnings if warnings is not None else [[] for _ in self.text]
        given = {Modality.parse(m): v for m, v in (media or {}).items()}
        given.update(media_by_plural(by_plural, "AnyModalOutput()"))
        self.media: dict[Modality, list[list[Any]]] = {
            m: given.get(m, [[] for _ in self.text]) for m in media_modalities()}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AnyModalOutput) and (self.text, self.media, self.token_ids)
                == (other.text, other.media, other.token_ids))

    def __repr__(self) -> str:
        counts = {m.spec.plural: sum(map(len, v)) for m, v in self.media.items() if any(v)}
        return f"AnyModalOutput(text={self.text!r}, media={counts})"


MediaArg = Any  # a medium, a list of media, or (batched) a list with one such entry per prompt
TextHook = Callable[[list[str]], None]  # on_text(each prompt's reply so far)
StepHook = Callable[[Modality, int, int], None]  # on_step(modality, step, total)


class AnyModalPipeline:
    """Encoders → input projectors → LLM with signal tokens → output projectors → generators."""

    def __init__(self, config: AnyModalConfig, processor: AnyModalProcessor, model: AnyModalModel,
                 generators: dict[Modality, Any]):
        self.config = config
        self.processor = processor
        self.model = model.eval()
        for m in config.input_projectors:  # the encoders' preprocessing, held by the processor
            processor.preprocessors.setdefault(m, functools.partial(model.encoder_for(m).preprocess, m))
        self.generators = dict(generators)
        for m in self.generators:  # lazy generators report their shapes from config files, unloaded
            self.check_generator(m)
        # for save_pretrained: components that came with a saved pipeline (copied on save), and where
        # each referenced component was loaded from (its resolved path or hub id)
        self._owned: set[str] = set()
        self._sources: dict[str, str | None] = {}
        # safetensors file (relative path) -> tensor -> storage dtype, for tensors loaded from files stored in
        # another dtype than float32 (the shipped default's float16): a save stores them as they came
        self._stored_dtypes: dict[str, dict[str, str]] = {}
        self.text_only = False  # loaded without its generators (text_only=True)

    # ================================================================ loading
    @classmethod
    def from_config(cls, config: AnyModalConfig | str | os.PathLike, device: str | torch.device | None = None,
                    *, allow_pickle: bool | None = None, text_only: bool = False,
                    torch_dtype: str | torch.dtype | None = None) -> "AnyModalPipeline":
        """Build every component from a config: pretrained ids/paths are loaded, the rest randomly initialised.

        ``allow_pickle=True`` lets components load pickle weights (``pytorch_model.bin`` and the like),
        which can run code: use it only for files you trust. By default (``None``: unless an enclosing
        :func:`anymodal.loading.pickle_allowed` block or the CLI's ``--allow-pickle`` says otherwise)
        only safetensors load.
        """
        if not isinstance(config, AnyModalConfig):
            config = AnyModalConfig.from_yaml(config)
        config = _with_dtype(config, torch_dtype)
        with _pickle_choice(allow_pickle):
            _check_types(config)
            generators = {}
            # generators first, for the output projectors' default targets; the model's random init
            # still sees the RNG state it would without them
            with torch.random.fork_rng(devices=[]):
                for m, g in config.generators.items():
                    if text_only:
                        continue
                    with _note_source(f"generators.{m.value}.pretrained", g.pretrained):
                        g = dataclasses.replace(g, pretrained=_fetchable(m, g.pretrained, "config"))
                        generators[m] = _build_generator(m, g, "config")
            if not text_only:  # text only: the output projectors go, so their targets are not needed
                config = _with_default_targets(config, generators)
            with _note_source("llm.tokenizer", config.llm.tokenizer or config.llm.model):
                processor = _make_processor(config, load_tokenizer(config.llm))
            if text_only:  # the processor keeps the signal tokens; no output projectors or generators
                config, generators = _text_only(config), {}
            with _note_source("llm.model or encoders", config.llm.model):
                model = AnyModalModel.build(config, processor.token_ids())
            _apply_lora(model, config, processor)
        pipe = cls(config, processor, model, generators)
        pipe.text_only = text_only
        # where referenced components came from, resolved now: a later save records them by these
        pipe._sources = {"llm": _resolve_source(config.llm.model)}
        pipe._sources.update({f"encoders/{n}": _resolve_source(e.pretrained) for n, e in config.encoders.items()})
        pipe._sources.update({f"generators/{m.value}": _resolve_source(g.pretrained)
                              for m, g in config.generators.items()})
        return pipe.to(device if device is not None else "cpu")

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | AnyModalConfig | None = None,
                        device: str | torch.device | None = None, *, allow_pickle: bool | None = None,
                        text_only: bool = False, torch_dtype: str | torch.dtype | None = None,
                        lazy_generators: bool = True) -> "AnyModalPipeline":
        """Load a saved pipeline directory, a YAML config file, a shipped config by name (``"tiny"``),
        or build an :class:`AnyModalConfig` given as an object.

        With no ``source``, load the default model shipped inside the package. Only safetensors
        weights load unless ``allow_pickle=True`` (unsafe: pickle files can run code when loaded).
        ``text_only=True`` leaves the generators out (the model still writes signal tokens, marked
        by placeholders in the text, but no media are made); ``torch_dtype`` overrides the LLM's
        and the generators' dtype. A saved pipeline's generators load when first needed unless
        ``lazy_generators=False``.
        """
        opts = {"allow_pickle": allow_pickle, "text_only": text_only, "torch_dtype": torch_dtype}
        if source is None:
            source = default_model_path()
        if isinstance(source, AnyModalConfig):
            return cls.from_config(source, device, **opts)
        path = Path(source)
        if path.is_dir():
            if not (path / INDEX_NAME).is_file():
                from .hf_systems import HF_SYSTEMS, config_from_hf, hf_system_type

                if hf_system_type(path) is not None:  # a released LLaVA / BLIP-2 / InstructBLIP folder, as it is
                    return cls.from_config(config_from_hf(path), device, **opts)
                raise FileNotFoundError(f"{path} is not a saved anymodal pipeline (no {INDEX_NAME}) nor a Hugging "
                                        f"Face checkpoint anymodal runs unchanged (config.json model_type "
                                        f"{', '.join(HF_SYSTEMS)})")
            with _pickle_choice(allow_pickle):
                return cls._load_saved(path, device, text_only, torch_dtype, lazy_generators)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_config(path, device, **opts)
        named = shipped_config(str(source))
        if named is not None:
            return cls.from_config(named, device, **opts)
        raise FileNotFoundError(f"{source!r} is neither a saved pipeline directory, a YAML config, nor a shipped "
                                f"config name ({', '.join(list_configs())})")

    @classmethod
    def _load_saved(cls, path: Path, device, text_only: bool = False, torch_dtype: str | torch.dtype | None = None,
                    lazy_generators: bool = True) -> "AnyModalPipeline":
        """Every path in the index stays inside ``path``; components kept elsewhere are entries of kind
        ``external`` with an absolute path or a hub id."""
        saved = _SavedPipeline(path)
        saved.config = config = _with_dtype(saved.config, torch_dtype)
        if text_only:  # no generators, so no output projectors to feed them (a 7B NExT-GPT's: 370 MB)
            saved.config = config = _text_only(config)
        processor = saved.processor()
        lm, encoders = saved.language_model(processor), saved.encoders()
        with torch.device("meta"):  # the projectors the config asks for, without memory, against their files
            saved.check_projectors(AnyModalModel(config, lm, encoders, processor.token_ids()))
        model = AnyModalModel.build(config, processor.token_ids(), language_model=lm, encoders=encoders,
                                    load_projector_weights=False)
        saved.load_projectors(model)
        saved.load_adapter(model)
        pipe = cls(config, processor, model, {} if text_only else saved.generators(lazy_generators))
        pipe.text_only = text_only
        pipe._owned, pipe._sources = saved.owned, saved.sources
        pipe._stored_dtypes = stored_dtypes(path)
        return pipe.to(device if device is not None else "cpu")

    def check_generator(self, modality: Modality) -> None:
        """Raise if the output projector's targets do not match what the generator takes."""
        want = {k: tuple(v) for k, v in self.config.output_projectors[modality].targets.items()}
        have = {k: tuple(v) for k, v in self.generators[modality].conditioning_shapes.items()}
        if want != have:
            raise ValueError(f"output_projectors[{modality.value}].targets {want} do not match what the "
                             f"{self.config.generators[modality].type} generator takes: {have}")

    # ================================================================ saving
    def save_pretrained(self, directory: str | os.PathLike, save_frozen: bool = False, *,
                        overwrite: bool = False) -> Path:
        """Save every component in its own subfolder, plus ``anymodal_index.json`` (safetensors only).

        Frozen components loaded from a hub id or a path outside the installed package are recorded
        as ``external`` (by hub id or absolute path), not copied, unless ``save_frozen``; every
        other path in the index is relative and inside ``directory``. Components that came with a
        saved pipeline or lie inside the installed package are copied. The directory is written
        beside its destination and moved into place, so an interrupted save never leaves a
        half-written pipeline over an old one.

        Each weight loaded from a saved pipeline is stored in the dtype it was stored in there (the
        shipped default's float16 stays float16, whatever dtype it ran in); weights built or
        loaded otherwise are stored in the dtype they have in memory.

        An earlier saved pipeline at ``directory`` is replaced; any other non-empty directory is
        refused unless ``overwrite=True``, and a file, or a directory holding a component the saved
        pipeline refers to, is always refused (:func:`anymodal.utils.check_replaceable`).
        """
        directory = Path(directory)
        if self.text_only:
            raise ValueError("this pipeline was loaded with text_only=True and has no generators to save; load it "
                             "without text_only to save it")
        check_replaceable(directory, marker=INDEX_NAME, known=SAVED_NAMES, what="save_pretrained:",
                          overwrite=overwrite, keep=[s for s in self._sources.values() if s and os.path.isabs(s)])
        atomic_dir(directory, lambda tmp: self._write_into(tmp, save_frozen))
        return directory

    def _write_into(self, tmp: Path, save_frozen: bool) -> None:
        """Write every component and the index into the new directory ``tmp``."""
        from safetensors.torch import save_model

        components: dict[str, Any] = {"encoders": {}, "input_projectors": {}, "output_projectors": {},
                                      "generators": {}, "adapter": None}
        self.processor.save_pretrained(tmp / "processor")
        lm = self.model.language_model
        base, state = lm, None
        if _is_peft(lm):
            lm.save_pretrained(tmp / "llm_adapter", safe_serialization=True)
            components["adapter"] = "llm_adapter"
            base, state = lm.get_base_model(), _base_state_dict(lm)
        llm_ref = self._reference("llm", self.config.llm.model, save_frozen)
        if llm_ref is None:
            base.save_pretrained(tmp / "llm", safe_serialization=True, state_dict=state)
            components["llm"] = {"kind": "full", "path": "llm"}
        else:
            rows = (list(range(base.get_input_embeddings().weight.shape[0]))
                    if self.config.llm.embedding_rows == "all" else self.processor.new_token_ids)
            _save_token_rows(base, state, rows, tmp / "llm")
            components["llm"] = {"kind": "token_rows", "path": "llm", "base": llm_ref}
        for name, e in self.config.encoders.items():
            ref = None if e.trainable else self._reference(f"encoders/{name}", e.pretrained, save_frozen)
            if ref is not None:
                components["encoders"][name] = {"kind": "external", "source": ref}
            else:
                self.model.encoders[name].save_pretrained(tmp / "encoders" / name)
                components["encoders"][name] = {"kind": "saved", "path": f"encoders/{name}"}
        for group in ("input_projectors", "output_projectors"):
            for m, mod in getattr(self.model, group).items():
                (tmp / group).mkdir(exist_ok=True)
                save_model(mod, str(tmp / group / f"{m}.safetensors"))
                components[group][m] = f"{group}/{m}.safetensors"
        for m, gen in self.generators.items():
            ref = self._reference(f"generators/{m.value}", self.config.generators[m].pretrained, save_frozen)
            if ref is not None:
                components["generators"][m.value] = {"kind": "external", "source": ref}
            else:
                gen.save_pretrained(tmp / "generators" / m.value)
                components["generators"][m.value] = {"kind": "saved", "path": f"generators/{m.value}"}
        index = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(), "components": components}
        atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=2))
        self.config.to_yaml(tmp / "config.yaml")
        restore_stored_dtypes(tmp, self._stored_dtypes)

    def _reference(self, name: str, pretrained: str | None, save_frozen: bool) -> str | None:
        """How a save records a frozen component that was loaded from elsewhere: its absolute path or
        hub id (an ``external`` index entry), or ``None`` to copy it. Components that came with a saved
        pipeline, or that lie inside the installed package, are copied: the saved copy must not depend
        on a directory that may move or go."""
        if pretrained is None or save_frozen or name in self._owned:
            return None
        source = self._sources.get(name) or _resolve_source(pretrained)
        if source is None or (os.path.isabs(source) and _inside_package(Path(source))):
            return None
        return source

    def to(self, device: str | torch.device) -> "AnyModalPipeline":
        self.model.to(device)
        for gen in self.generators.values():
            gen.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int | None:
        """Tokens the LLM can attend to: ``llm.max_length`` (held by the processor, which enforces it),
        else the model's position limit."""
        return self.processor.max_length or getattr(self.model.llm_config, "max_position_embeddings", None)

    # ================================================================ calling
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], images: MediaArg = None, audios: MediaArg = None,
                 videos: MediaArg = None, *, max_new_tokens: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, settings: Any = None, seed: int | None = None,
                 generator: torch.Generator | None = None, progress: bool | None = None,
                 logits_processor: list | None = None, on_text: TextHook | None = None,
                 on_step: StepHook | None = None, **media: MediaArg) -> AnyModalOutput:
        """Generate text, and any media the model signals, for one prompt or a batch of prompts.

        Args:
            prompt: a string, or a list of strings (a batch). ``<image>``/``<audio>``/``<video>``
                in the text mark where each input medium goes; without them media are placed first.
            images, audios, videos: for one prompt, a medium or a list of media; for a batch, a list
                with one entry (``None``, a medium or a list of media) per prompt. Images may be file
                paths, PIL images or arrays; audio file paths, ``Audio`` or ``(array, sample_rate)``;
                video file paths or lists of frames. A registered modality's media come by its plural
                the same way (``depths=...``).
            settings: per-modality generation settings: ``{"image": ImageSettings(...), "audio": {...}}``
                or a list of settings dataclasses.
            seed / generator: make a run repeatable (``generator`` is a ``torch.Generator``, as in diffusers). With ``seed``, media k of each prompt use seed
                ``seed + k``, so a prompt gives the same output alone or in a batch.
            logits_processor: extra ``transformers`` logits processors for the LLM, applied before
                signal-span forcing.
            on_text / on_step: progress hooks, called in the generating thread. ``on_text(texts)``
                after each LLM token, with each prompt's reply so far (as ``text`` will hold it);
                ``on_step(modality, step, total)`` after each denoising step of a generator that
                reports steps (the diffusers-backed ones do). An exception a hook raises stops the
                generation at once and propagates; nothing is returned.
        """
        single, prompts = check_prompts(prompt)
        rows = _rows_of_media(prompts, media_by_plural(dict(images=images, audios=audios, videos=videos, **media),
                                                       "AnyModalPipeline.__call__()"), single)
        conversations = []
        for text, row_media in zip(prompts, rows):
            if not text.strip() and not any(row_media.values()):
                raise ValueError("prompt is empty: give some text, or media to respond to")
            conversations.append([Message("user", text, row_media)])
        return self.generate(conversations, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, settings=settings, seed=seed,
                             generator=generator, progress=progress, logits_processor=logits_processor,
                             on_text=on_text, on_step=on_step)

    @torch.no_grad()
    def generate(self, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, settings: Any = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 progress: bool | None = None, logits_processor: list | None = None,
                 on_text: TextHook | None = None, on_step: StepHook | None = None) -> AnyModalOutput:
        """The steps behind ``__call__``, over whole conversations (used by dialogue sessions)."""
        # 1. check inputs
        if not conversations:
            raise ValueError("nothing to generate: no prompts were given")
        max_new_tokens = check_max_new_tokens(max_new_tokens) or self.config.llm.max_new_tokens
        seed = check_seed(seed)
        check_sampling(temperature, top_p)
        gen_settings = self.resolve_settings(settings)
        progress = sys.stderr.isatty() if progress is None else progress

        # 2. lay out the inputs: checked, placeholders placed, formatted, tokenised, media preprocessed
        limit = self.context_length
        for i, conv in enumerate(conversations):  # a bound on characters first: tokenising megabytes takes seconds
            self.processor.check_chars("".join(m.content for m in conv), limit,
                                       "the prompt" if len(conversations) == 1 else f"prompt[{i}]")
        inputs = self.processor.prepare(conversations)
        longest = int(inputs.attention_mask.sum(-1).max())
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"the prompt is {longest} tokens long (media positions included); with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's context of {limit} tokens")
        device = self.device
        input_ids, attention_mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)

        # 3. encode media into LLM embeddings
        features = {}
        for m, pixels in inputs.media.items():
            features[m] = self.model.encode_media(m, pixels.to(device), inputs.instructions.get(m))
            items = inputs.sources[m]
            bad = [describe(items[i]) for i in (~torch.isfinite(features[m]).flatten(1).all(-1)).nonzero().flatten().tolist()]
            if bad:  # e.g. audio samples far outside [-1, 1]: the reply would be empty or nonsense
                raise MediaError(f"{m.value} input {', '.join(bad)} gives non-finite features; check its "
                                 "values (audio samples belong in [-1, 1], image floats in [0, 1])")

        # 4. generate text and signal tokens; read the signal tokens' hidden states
        llm_seed = seed if seed is not None else (generator.initial_seed() if generator else None)
        with seeded(llm_seed if do_sample else None):  # sampling draws from torch's global RNG
            result = generate_text(self.model, self.processor, input_ids, attention_mask, features,
                                   max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                   logits_processor=logits_processor, on_text=on_text)

        # 5. project signal states and call each generator once for the whole batch
        n = len(conversations)
        out = AnyModalOutput(text=[""] * n, token_ids=result.sequences)
        for m, hidden in result.signal_hidden.items():
            if m not in self.generators:
                continue
            owners = [(row, k) for row, spans in enumerate(result.spans) for k, (mm, _) in enumerate(spans) if mm == m]
            gen = self.generators[m]
            conditioning = self.model.project_signal(m, hidden)
            rngs = _rngs_for(owners, seed, generator)
            media_out = gen.render(conditioning, gen_settings.get(m), rng=rngs, progress=progress,
                                   **_step_hook(gen, m, on_step))
            for (row, _), item in zip(owners, media_out):
                out.media[m][row].append(item)

        # 6. decode text, each medium marked by its placeholder
        out.text = [self.processor.split_output(seq)[0] for seq in result.sequences]
        out.warnings = [missing_media_warnings(conv, out, row, set(self.generators))
                        for row, conv in enumerate(conversations)]
        for row, found in enumerate(out.warnings):
            for w in found:
                if len(conversations) > 1:
                    logger.warning("prompt %d: %s", row, w)
                else:  # one prompt (a chat turn, most calls) needs no number
                    logger.warning("%s", w)
        return out

    def resolve_settings(self, settings: Any) -> dict[Modality, Any]:
        """Per-modality settings (dict by modality, or a list of settings dataclasses) merged with the
        generators' defaults; raises on an unknown modality, field or value."""
        if settings is None:
            raw: dict = {}
        elif isinstance(settings, dict):
            raw = {Modality.parse(k): v for k, v in settings.items()}
        elif isinstance(settings, (list, tuple)):
            by_class = {m.spec.settings_class: m for m in media_modalities()}
            raw = {}
            for s in settings:
                # a generator's own subclass (unCLIP's UnCLIPImageSettings) counts as its modality's settings
                base = next((c for c in type(s).__mro__ if c in by_class), None)
                if base is None:
                    raise TypeError(f"unknown settings object {type(s).__name__}; use "
                                    f"{', '.join(c.__name__ for c in by_class)}")
                raw[by_class[base]] = s
        else:
            raise TypeError(f"settings must be a dict keyed by modality or a list of settings, "
                            f"got {type(settings).__name__}")
        for m in raw:
            if m not in self.generators:
                raise ValueError(f"settings given for {m.value}, but this model generates "
                                 f"{', '.join(x.value for x in self.generators) or 'text only'}")
        return {m: gen.make_settings(raw.get(m)) for m, gen in self.generators.items()}


# ==================================================================== helpers
def requested_media(text: str) -> list[Modality]:
    """The media a request asks for, by each modality's ``request_words`` (whole words, any case)."""
    import re

    low = text.lower()
    return [m for m in media_modalities()
            if any(re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", low) for w in m.spec.request_words)]


def missing_media_warnings(conversation: Sequence[Message], out: AnyModalOutput, row: int,
                           generated: set[Modality]) -> list[str]:
    """Warnings for prompt ``row`` when its reply holds none of the media its request asked for: the
    media the last user message asks for (a request word, and no medium of that kind attached to it,
    which would make it a question about that medium) that the model can generate. One warning per
    request, saying whether the reply made no medium ("a green", with no image) or only another kind
    ("play a triangle tone" answered with an image). A reply with any medium it asked for is not
    warned about: "show me" asks for an image or a video, and either answers it. Replies
    are never dropped; this says that one fell short, so a batch record or a log does not pass it as
    done. (A medium of the right kind that is wrong in content is a quality error, not this.)"""
    last = next((m for m in reversed(conversation) if m.role == "user"), None)
    if last is None:
        return []
    wanted = [m for m in requested_media(last.content)
              if m in generated and not last.media.get(m) and m.spec.placeholder not in last.content]
    if not wanted or any(out.media[m][row] for m in wanted if m in out.media):
        return []
    made = [m.value for m in out.media if out.media[m][row]]
    instead = f"has only {' and '.join(made)}, no" if made else "has no"
    asked = " or ".join(m.value for m in wanted)
    return [f"the request asked for {asked} ({last.content[:80]!r}) but the reply {out.text[row][:80]!r} "
            f"{instead} {asked}"]


def _step_hook(gen: Any, m: Modality, on_step: StepHook | None) -> dict[str, Any]:
    """``render``'s ``on_step`` argument for ``on_step`` (none for a generator whose ``render`` takes
    no ``on_step``: one written before it existed simply reports no steps)."""
    if on_step is None or "on_step" not in inspect.signature(gen.render).parameters:
        return {}
    return {"on_step": functools.partial(on_step, m)}


def _rows_of_media(prompts: list[str], media: dict[Modality, Any], single: bool) -> list[dict[Modality, list]]:
    rows: list[dict[Modality, list]] = [{} for _ in prompts]
    for m, arg in media.items():
        if arg is None:
            continue
        spec = m.spec
        if single:
            per_row = [arg]
        else:
            if not isinstance(arg, (list, tuple)) or len(arg) != len(prompts):
                raise ValueError(f"with a batch of {len(prompts)} prompts, {spec.plural} must be a list with one "
                                 f"entry (None, a {m.value} or a list of them) per prompt")
            per_row = list(arg)
        for row, entry in zip(rows, per_row):
            if entry is None:
                continue
            if spec.is_medium(entry):
                items = [entry]
            elif isinstance(entry, (list, tuple)):
                items = list(entry)
            else:  # a dict or set would be iterated by its keys
                raise MediaError(f"cannot use {type(entry).__name__} as {m.value} input; expected "
                                 f"{spec.accepts}, or a list of them")
            for it in items:
                if not spec.is_medium(it):
                    raise MediaError(f"cannot use {type(it).__name__} as {m.value} input; expected {spec.accepts}")
            if items:
                row[m] = items
    return rows


_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # besides F32


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without loading tensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        return json.loads(f.read(size))


def stored_dtypes(directory: Path) -> dict[str, dict[str, str]]:
    """For every ``*.safetensors`` file under ``directory`` (by relative path), its floating-point
    tensors stored in a dtype other than float32, with that dtype's torch name."""
    found: dict[str, dict[str, str]] = {}
    for f in sorted(directory.rglob("*.safetensors")):
        try:
            header = _safetensors_header(f)
        except (OSError, ValueError):
            continue  # the loaders have read this file already; a save just keeps memory's dtype
        kept = {name: _SAFETENSORS_FLOATS[h["dtype"]] for name, h in header.items()
                if name != "__metadata__" and isinstance(h, dict) and h.get("dtype") in _SAFETENSORS_FLOATS}
        if kept:
            found[f.relative_to(directory).as_posix()] = kept
    return found


def restore_stored_dtypes(directory: Path, dtypes: dict[str, dict[str, str]]) -> None:
    """Rewrite the files a save wrote under ``directory`` so that each tensor named in ``dtypes`` (from
    :func:`stored_dtypes` of the directory it was loaded from) is stored in its recorded dtype again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for rel, names in dtypes.items():
        f = directory / rel
        if not f.is_file():
            continue  # not written by this save (an external component, or a layout that changed)
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        changed = {k: v.to(getattr(torch, names[k])) for k, v in tensors.items()
                   if k in names and v.is_floating_point() and str(v.dtype) != f"torch.{names[k]}"}
        if changed:
            save_file({**tensors, **changed}, str(f), metadata=metadata)


class _SavedPipeline:
    """Reads a directory written by :meth:`AnyModalPipeline.save_pretrained`, one component at a
    time, keeping every path inside it. Records which components came with it (``owned``: copied
    by a later save) and where the others were loaded from (``sources``)."""

    def __init__(self, path: Path):
        self.path = path
        self.index_file = path / INDEX_NAME
        check_links_inside(path)  # every file a loader reads below is the directory's own
        try:
            index = json.loads(self.index_file.read_text(encoding="utf-8"))
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
            if index.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unsupported anymodal format version {index.get('format_version')!r} "
                                 f"(this anymodal reads {FORMAT_VERSION})")
            self.config = AnyModalConfig.from_dict(index["config"])
            self.saved = index["components"]
            if not isinstance(self.saved, dict):
                raise ValueError("'components' must be an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.index_file} is not a valid anymodal index: "
                             f"{e if not isinstance(e, KeyError) else f'missing {e}'}") from None
        _check_types(self.config)
        self.owned: set[str] = set()
        self.sources: dict[str, str | None] = {}

    def processor(self) -> AnyModalProcessor:
        proc_dir = confined(self.path, "processor", "processor")
        if not (proc_dir / "processor_config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a complete saved pipeline: "
                                    f"{proc_dir / 'processor_config.json'} is missing")
        return AnyModalProcessor.from_pretrained(proc_dir)

    def language_model(self, processor: AnyModalProcessor) -> torch.nn.Module:
        entry = _entry(self.saved, "llm")
        if entry.get("kind") == "full":
            self.owned.add("llm")
            return load_language_model(self.config.llm, str(confined(self.path, entry.get("path"),
                                                                      "components.llm.path")))
        if entry.get("kind") == "token_rows":  # a referenced base model plus the rows of the tokens we added
            rows = confined(self.path, entry.get("path"), "components.llm.path")
            base = check_external(entry.get("base", self.config.llm.model), "components.llm.base")
            self.sources["llm"] = base
            lm = load_language_model(dataclasses.replace(self.config.llm, model=base))
            # the added tokens' rows straight from the file, in slices: no random init, no second read
            grow_token_rows(lm, len(processor.tokenizer), rows / "token_rows.safetensors")
            return lm
        raise ValueError(f"{self.index_file}: components.llm.kind must be 'full' or 'token_rows', "
                         f"got {entry.get('kind')!r}")

    def encoders(self) -> dict[str, torch.nn.Module]:
        encoders = {}
        for name, e in self.config.encoders.items():
            entry = _entry(self.saved.get("encoders"), name, "encoders")
            cls_ = ENCODERS.get(e.type)
            if entry.get("kind") == "saved":
                encoders[name] = cls_.from_pretrained(confined(self.path, entry.get("path"),
                                                               f"components.encoders.{name}"))
                self.owned.add(f"encoders/{name}")
            else:
                src = _external_entry(entry, e.pretrained, f"components.encoders.{name}")
                self.sources[f"encoders/{name}"] = src
                encoders[name] = cls_.from_config(e.options, e.modalities, src)
        return encoders

    def _projector_files(self, model: AnyModalModel) -> Iterator[tuple[str, str, torch.nn.Module, Path]]:
        for group in ("input_projectors", "output_projectors"):
            files = self.saved.get(group)
            files = files if isinstance(files, dict) else {}
            for m, proj in getattr(model, group).items():
                if m not in files:
                    raise ValueError(f"{self.index_file}: components.{group} has no weights for {m!r}; the config "
                                     "builds that projector and it would stay randomly initialised")
                yield group, m, proj, confined(self.path, files[m], f"components.{group}.{m}")

    def check_projectors(self, meta_model: AnyModalModel) -> None:
        """The projectors of a model built on the meta device against their files' headers."""
        for group, m, proj, path in self._projector_files(meta_model):
            check_file_fits(proj, path, f"{group}[{m}]")

    def load_projectors(self, model: AnyModalModel) -> None:
        for group, m, proj, path in self._projector_files(model):
            load_safetensors_into(proj, path, f"{group}[{m}]")

    def load_adapter(self, model: AnyModalModel) -> None:
        if not self.saved.get("adapter"):
            return
        from peft import PeftModel

        adapter = confined(self.path, self.saved["adapter"], "components.adapter")
        refuse_pickle(adapter, "the LoRA adapter")
        with peft_quietly():
            model.language_model = PeftModel.from_pretrained(model.language_model, str(adapter))

    def generators(self, lazy: bool = True) -> dict[Modality, Any]:
        """Each generator, reading only its configs now when ``lazy`` (its weights load when first used)."""
        generators = {}
        for m, g in self.config.generators.items():
            entry = _entry(self.saved.get("generators"), m.value, "generators")
            where = f"components.generators.{m.value}"
            if entry.get("kind") == "saved":
                g = dataclasses.replace(g, pretrained=str(confined(self.path, entry.get("path"), where)),
                                        components=None)
                self.owned.add(f"generators/{m.value}")
                # a lazy generator reads its weights on first use; pickle weights are refused now, at load,
                # as an eager one's are (a directory scan, no weights read)
                refuse_pickle(g.pretrained, f"the {m.value} generator ({where})")
            else:
                g = dataclasses.replace(g, pretrained=_external_entry(entry, g.pretrained, where), components=None)
                self.sources[f"generators/{m.value}"] = g.pretrained
                g = dataclasses.replace(g, pretrained=_fetchable(m, g.pretrained, "saved"))
            generators[m] = _build_generator(m, dataclasses.replace(g, lazy=g.lazy or lazy), "saved")
        return generators


def _with_dtype(config: AnyModalConfig, dtype: str | torch.dtype | None) -> AnyModalConfig:
    """``config`` with the LLM and every generator in ``dtype`` (a copy; None: as configured)."""
    if dtype is None:
        return config
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if dtype not in names:
            raise ValueError(f"torch_dtype must be float32, float16 or bfloat16, got {dtype}")
        dtype = names[dtype]
    from .utils import torch_dtype as check

    check(dtype)
    config = copy.deepcopy(config)
    config.llm.dtype = dtype
    for g in config.generators.values():
        g.dtype = dtype
    return config


class GeneratorUnavailable(OSError):
    """A generator's weights cannot be had: the message names the component, its source and the fix."""


def _text_only(config: AnyModalConfig) -> AnyModalConfig:
    """``config`` without its output projectors and generators (a copy)."""
    config = copy.copy(config)
    config.output_projectors, config.generators = {}, {}
    return config


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _generator_fix(m: Modality, origin: str) -> str:
    if origin == "saved":
        return (f"give a local diffusers folder (convert again with --{m.value}-generator DIR, or set "
                f"components.generators.{m.value}.source in {INDEX_NAME}), or load text only (text_only=True, "
                "CLI --text-only)")
    return (f"set generators.{m.value}.pretrained to a local diffusers folder, or load text only "
            "(text_only=True, CLI --text-only)")


def _fetchable(m: Modality, source: str | None, origin: str) -> str | None:
    """A generator's source as it can be loaded now: a local folder as it is; a hub id, when the hub
    is off (HF_HUB_OFFLINE=1), as its folder in the local cache, or an error naming the component,
    the id and the fix; nothing here contacts the hub."""
    if source is None or os.path.isdir(source):
        return source
    if os.path.isabs(source) or not _hub_offline():
        if os.path.isabs(source):
            raise FileNotFoundError(f"generators.{m.value}: {source} does not exist; {_generator_fix(m, origin)}")
        return source
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "model_index.json")
    if isinstance(found, str):
        return str(Path(found).parent)  # the cached snapshot, read as a local folder
    raise GeneratorUnavailable(f"generators.{m.value}: {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                  f"forbids fetching it; {_generator_fix(m, origin)}")


def _build_generator(m: Modality, g, origin: str):
    """``GENERATORS[g.type].from_config(g)``; a hub id that cannot be fetched is one line naming the fix."""
    try:
        return GENERATORS.get(g.type).from_config(g)
    except OSError as e:
        if g.pretrained is None or os.path.isdir(g.pretrained) or isinstance(e, FileNotFoundError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GeneratorUnavailable(f"generators.{m.value}: cannot fetch {g.pretrained!r} ({first}); "
                      f"{_generator_fix(m, origin)}") from None


def _pickle_choice(allow: bool | None):
    """``allow_pickle`` as given, or the enclosing choice (default: refuse) when ``None``."""
    return contextlib.nullcontext() if allow is None else pickle_allowed(allow)


def _entry(group: Any, name: str, where: str | None = None) -> dict[str, Any]:
    label = f"components.{where}.{name}" if where else f"components.{name}"
    entry = group.get(name) if isinstance(group, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"{INDEX_NAME}: {label} is missing; the config has this component")
    return entry


def _external_entry(entry: dict[str, Any], pretrained: str | None, where: str) -> str:
    """The source of an ``external`` entry (or of a ``reference`` entry of older saves, by the config's
    ``pretrained``): an absolute path or a hub id, never a relative path."""
    kind = entry.get("kind")
    if kind == "external":
        return check_external(entry.get("source"), f"{where}.source")
    if kind == "reference":
        return check_external(pretrained, f"{where} (a reference to the config's pretrained)")
    raise ValueError(f"{INDEX_NAME}: {where}.kind must be 'saved' or 'external', got {kind!r}")


def _resolve_source(value: str | None) -> str | None:
    """A pretrained source as a save can record it: an existing local path made absolute, else the
    string itself (a hub id)."""
    if value is None:
        return None
    return str(Path(value).resolve()) if os.path.exists(value) else value


def _inside_package(path: Path) -> bool:
    from importlib import resources

    roots = {Path(str(resources.files(pkg))).resolve() for pkg in ("anymodal", "anymodal.encoders",
                                                                    "anymodal.generators", "anymodal.configs")}
    path = path.resolve()
    return any(path == r or r in path.parents for r in roots)


def _rngs_for(owners: list[tuple[int, int]], seed: int | None, generator: torch.Generator | None
              ) -> list[torch.Generator] | torch.Generator | None:
    """The random number generators the media generators draw their noise from: the caller's
    ``torch.Generator`` (diffusers' ``generator=``), or one per medium seeded ``seed + k``."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    # CPU generators: diffusers draws the initial noise on CPU and moves it, so a seed gives the
    # same starting latents on every device
    return [torch.Generator().manual_seed(seed + k) for _, k in owners]


def _with_default_targets(config: AnyModalConfig, generators: dict[Modality, Any]) -> AnyModalConfig:
    """``config`` with every output projector's missing ``targets`` taken from its generator's
    ``conditioning_shapes`` (a copy; the caller's config is left as it was)."""
    missing = [m for m, p in config.output_projectors.items() if p.targets is None]
    if not missing:
        return config
    config = copy.deepcopy(config)
    for m in missing:
        if m not in generators:
            raise ValueError(f"output_projectors.{m.value}.targets is not given and there is no {m.value} generator to "
                             "take it from; give targets: {name: [sequence_length, dim]}")
        shapes = generators[m].conditioning_shapes
        config.output_projectors[m].targets = {k: [int(s) for s in v] for k, v in shapes.items()}
    return config


def _make_processor(config: AnyModalConfig, tokenizer) -> AnyModalProcessor:
    media_tokens = {m: p.num_tokens for m, p in config.input_projectors.items()}
    signal = {m: n for m, n in config.llm.signal_tokens.items() if m in config.generators}
    layout = {}
    if config.llm.prompt_format is not None:  # a released system's prompt, token for token
        from .hf_systems import prompt_format

        fmt = prompt_format(config.llm.prompt_format)
        tokenizer.chat_template = fmt.template
        layout = {"add_special_tokens": fmt.add_special_tokens, "media_before_bos": fmt.media_before_bos}
    if any(p.type == "qformer" and p.options.get("instruction") for p in config.input_projectors.values()):
        from .hf_systems import load_instruction_tokenizer

        layout["instruction_tokenizer"] = load_instruction_tokenizer(config)
    return AnyModalProcessor(tokenizer, signal, media_tokens, config.llm.system_prompt, config.llm.max_length,
                             prompt_options=config.llm.prompt, **layout)


@contextlib.contextmanager
def _note_source(field_name: str, source: str | None) -> Iterator[None]:
    """Add a note naming the config field and its source to a loading ``OSError`` (offline, a missing
    directory), which then goes on as it was: same type, same traceback. The CLI prints the notes."""
    try:
        yield
    except OSError as error:
        if not isinstance(error, (FileNotFoundError, GeneratorUnavailable)):
            hint = (" Without network access, set it to a local directory holding the weights."
                    if os.environ.get("HF_HUB_OFFLINE") else "")
            error.add_note(f"cannot load {field_name} {source!r}.{hint}")
        raise


def _check_types(config: AnyModalConfig) -> None:
    """Resolve every component type now, so a typo, or a generator that does not make its
    modality, fails before anything heavy loads."""
    from .registry import check_component_types

    problems = check_component_types(config)
    if problems:
        raise ValueError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))


def _apply_lora(model: AnyModalModel, config: AnyModalConfig, processor: AnyModalProcessor) -> None:
    if config.llm.lora is None:
        return
    from peft import LoraConfig, get_peft_model

    lc = config.llm.lora
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                          task_type="CAUSAL_LM")
    with peft_quietly():
        model.language_model = get_peft_model(model.language_model, peft_cfg)


def _is_peft(lm) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(lm, PeftModel)


def _strip_peft_key(key: str) -> str:
    return key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")


def _base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own weights inside a peft model, under the base model's key names.

    LoRA and trainable-token layers wrap the original modules (``q_proj.base_layer.weight``);
    their own tensors are saved with the adapter. Reading the wrapped tensors in place avoids a
    full copy of the model, which for a 7B backbone would double the memory a save needs.
    """
    return {_strip_peft_key(k): v for k, v in peft_model.get_base_model().state_dict().items()
            if ".lora_" not in k and "trainable_tokens_delta" not in k}


def _weight_key(model, module) -> str:
    """The state-dict key of ``module.weight`` in the plain model. Found through the module, not
    the tensor: peft's trainable-token wrapper returns a merged copy as its ``weight``."""
    for name, m in model.named_modules():
        if m is module:
            return _strip_peft_key(f"{name}.weight")
    raise ValueError("embedding module not found in the model")


def _save_token_rows(lm, state: dict[str, torch.Tensor] | None, token_ids: list[int], directory: Path) -> None:
    """Save only the embedding rows of the tokens anymodal added (the base model is referenced)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else lm.state_dict()
    ids = torch.tensor(token_ids, dtype=torch.long)
    in_key = _weight_key(lm, lm.get_input_embeddings())
    tensors = {"token_ids": ids, "input_rows": state[in_key][ids].detach().cpu().contiguous()}
    out_emb = lm.get_output_embeddings()
    tied = getattr(lm.config.get_text_config(), "tie_word_embeddings", False)
    if out_emb is not None and not tied:
        tensors["output_rows"] = state[_weight_key(lm, out_emb)][ids].detach().cpu().contiguous()
    save_file(tensors, str(directory / "token_rows.safetensors"))


def list_configs() -> list[str]:
    """Names of the configs shipped in ``anymodal.configs``."""
    from importlib import resources

    return sorted(p.name.rsplit(".", 1)[0] for p in resources.files("anymodal.configs").iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def shipped_config(name: str) -> Path | None:
    from importlib import resources

    p = resources.files("anymodal.configs") / f"{name}.yaml"
    return Path(str(p)) if p.is_file() else None


def default_model_dir() -> Path:
    """Where the package's default model lives (``anymodal/assets/default``), whether or not one is shipped."""
    from importlib import resources

    return Path(str(resources.files("anymodal") / "assets" / "default"))


def default_model_path() -> Path:
    """The model shipped inside the package (the trained toy world), or a clear error if absent."""
    p = default_model_dir()
    if (p / INDEX_NAME).is_file():
        return p
    raise FileNotFoundError("no default model is shipped in this install; name one: a saved pipeline directory, "
                            f"a YAML config, or a shipped config ({', '.join(list_configs())})")
