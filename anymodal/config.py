"""Configuration: one dataclass per component, composed into :class:`AnyModalConfig`.

Every dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the
field. ``AnyModalConfig.from_yaml`` / ``from_dict`` reject unknown fields, so a typo in a
YAML file is reported instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checks import SIZE_LIMITS, positive_int
from .modality import Modality, media_modalities

DTYPES = ("float32", "float16", "bfloat16")



def default_signal_tokens() -> dict[Modality, int]:
    """Each media modality's default signal-token count (its spec's; the built-ins have NExT-GPT's 4, 8, 24)."""
    return {m: m.spec.default_signal_tokens for m in media_modalities()}


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")


def _media_modality(name: str, value: Modality | str) -> Modality:
    m = Modality.parse(value)
    if m not in media_modalities():
        raise ValueError(f"{name}: {m.value!r} is not a media modality; expected one of "
                         f"{', '.join(media_modalities())}")
    return m


@dataclass
class EncoderConfig:
    """A modality encoder serving one or more modalities (ImageBind serves image, audio and video)."""

    type: str = "imagebind"
    modalities: list[Modality] = field(default_factory=lambda: [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO])
    pretrained: str | None = None  # local checkpoint path (imagebind_huge.pth) or hub id (HF encoders)
    options: dict[str, Any] = field(default_factory=dict)  # architecture; validated by the encoder class
    trainable: bool = False

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("encoder.modalities must name at least one modality")
        self.modalities = [_media_modality("encoder.modalities", m) for m in self.modalities]


@dataclass
class InputProjectorConfig:
    """Maps encoder features of one modality into the LLM's embedding space."""

    type: str = "linear"  # linear | mlp | qformer
    num_tokens: int = 1  # LLM positions each medium occupies
    hidden_dim: int | None = None
    num_layers: int = 2
    num_heads: int = 8
    # weights to start from: an anymodal projector .safetensors file, or a Hugging Face composite checkpoint
    # (LLaVA's multi_modal_projector; BLIP-2's/InstructBLIP's query tokens, Q-Former and language_projection)
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # type-specific; validated by the projector class
    # Use another modality's projector (one module, one set of weights), as NExT-GPT's single
    # llama_proj serves image, audio and video. The other fields are then taken from that one.
    share: Modality | None = None

    def __post_init__(self) -> None:
        if self.share is not None:
            self.share = _media_modality("input_projector.share", self.share)
        positive_int("input_projector.num_tokens", self.num_tokens, limit=SIZE_LIMITS["num_tokens"])
        positive_int("input_projector.num_layers", self.num_layers, limit=SIZE_LIMITS["num_layers"])
        positive_int("input_projector.num_heads", self.num_heads, limit=SIZE_LIMITS["num_heads"])
        if self.hidden_dim is not None:
            positive_int("input_projector.hidden_dim", self.hidden_dim, limit=SIZE_LIMITS["hidden_dim"])


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        positive_int("llm.lora.r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"llm.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("llm.lora.target_modules must not be empty")


TEMPLATE_ROLES = ("system", "user", "assistant", "generation")


@dataclass
class PromptOptions:
    """How the processor turns a conversation into token ids, and when generation stops.

    ``template`` maps each role (system, user, assistant) to a format string with ``{content}``
    and ``generation`` to the text that opens the model's turn; when unset, the tokenizer's chat
    template (or anymodal's ``### Human:`` default) is used. ``media_wrap[m]`` puts an opening
    and a closing token around every medium of modality ``m`` (NExT-GPT: ``<Img>``, ``</Img>``
    for all three). With ``bos_per_segment`` every text segment between media starts with BOS
    and is tokenised on its own, and one space either side of a medium is dropped. Generation
    stops after any of ``stop_strings``, which are cut from the text. ``signal_token_names[m]``
    names signal token ``i`` of ``m`` (with ``{i}``), e.g. ``"[IMG{i}]"``.
    """

    template: dict[str, str] | None = None
    media_wrap: dict[Modality, list[str]] = field(default_factory=dict)
    bos_per_segment: bool = False
    stop_strings: list[str] = field(default_factory=list)
    signal_token_names: dict[Modality, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.template is not None:
            unknown = sorted(set(self.template) - set(TEMPLATE_ROLES))
            if unknown:
                raise ValueError(f"llm.prompt.template: unknown role {unknown[0]!r}; allowed: {', '.join(TEMPLATE_ROLES)}")
            missing = [r for r in TEMPLATE_ROLES if r not in self.template]
            if missing:
                raise ValueError(f"llm.prompt.template must give every role; missing {missing[0]!r}")
            for role, text in self.template.items():
                if role != "generation" and "{content}" not in text:
                    raise ValueError(f"llm.prompt.template[{role}] must contain '{{content}}', got {text!r}")
        self.media_wrap = {_media_modality("llm.prompt.media_wrap", k): v for k, v in self.media_wrap.items()}
        for m, pair in self.media_wrap.items():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
                raise ValueError(f"llm.prompt.media_wrap[{m.value}] must be [opening_token, closing_token], got {pair!r}")
            self.media_wrap[m] = list(pair)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"llm.prompt.stop_strings must be non-empty strings, got {self.stop_strings!r}")
        self.signal_token_names = {_media_modality("llm.prompt.signal_token_names", k): v
                                   for k, v in self.signal_token_names.items()}
        for m, name in self.signal_token_names.items():
            if not isinstance(name, str) or "{i}" not in name:
                raise ValueError(f"llm.prompt.signal_token_names[{m.value}] must contain '{{i}}', got {name!r}")


@dataclass
class LLMConfig:
    """The causal-LM backbone: any ``AutoModelForCausalLM`` by id/path, or a random init from ``config``."""

    model: str | None = None  # hub id or local directory
    config: dict[str, Any] | None = None  # HF config dict (with model_type) for a randomly initialised model
    tokenizer: str | None = None  # defaults to ``model``; "bytes" builds a byte-level tokenizer in memory
    # "auto": AutoTokenizer (fast); "sentencepiece": the slow tokenizer.model, as transformers 4.x's
    # LlamaTokenizer (NExT-GPT's: a leading space stays a token)
    tokenizer_backend: str = "auto"
    gguf_file: str | None = None
    dtype: str = "float32"
    signal_tokens: dict[Modality, int] = field(default_factory=default_signal_tokens)
    lora: LoraConfig | None = None
    max_new_tokens: int = 64
    max_length: int | None = None  # context limit; defaults to the model's max_position_embeddings
    system_prompt: str | None = None
    gradient_checkpointing: bool = False
    # a released system's prompt layout (anymodal.hf_systems.PROMPT_FORMATS: llava-1.5, blip-2, instructblip);
    # None: the tokenizer's chat template, else anymodal's default
    prompt_format: str | None = None
    # explicit prompt options (template, media wrapping, BOS per segment, stop strings, signal-token names)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    # Embedding rows a saved pipeline keeps over a referenced base model: "added" (the tokens
    # anymodal added) or "all" (a checkpoint that changed base rows too, like NExT-GPT's).
    embedding_rows: str = "added"

    def __post_init__(self) -> None:
        if self.prompt_format is not None and self.prompt.template is not None:
            raise ValueError("llm: give llm.prompt_format (a released system's layout) or llm.prompt.template, not both")
        if self.tokenizer_backend not in ("auto", "sentencepiece"):
            raise ValueError(f"llm.tokenizer_backend must be 'auto' or 'sentencepiece', got {self.tokenizer_backend!r}")
        if self.embedding_rows not in ("added", "all"):
            raise ValueError(f"llm.embedding_rows must be 'added' or 'all', got {self.embedding_rows!r}")
        if (self.model is None) == (self.config is None):
            raise ValueError("llm: give exactly one of llm.model (hub id or path) or llm.config (random init)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("llm.config must contain 'model_type' (e.g. 'llama', 'qwen2')")
        if self.model is None and self.tokenizer is None:
            raise ValueError("llm.tokenizer is required when llm.config is used (a path, or 'bytes')")
        _check_dtype("llm.dtype", self.dtype)
        positive_int("llm.max_new_tokens", self.max_new_tokens)
        self.signal_tokens = {_media_modality("llm.signal_tokens", k): v for k, v in self.signal_tokens.items()}
        for m, n in self.signal_tokens.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"llm.signal_tokens[{m.value}] must be a positive integer, got {n!r}")


@dataclass
class OutputProjectorConfig:
    """Maps the hidden states of a signal-token block to a generator's conditioning.

    ``targets`` names each conditioning tensor the generator takes and its (sequence, dim)
    shape, e.g. ``{"prompt_embeds": [77, 768]}`` for SD-1.5. Left out (None), it is taken from the
    generator's ``conditioning_shapes`` when the pipeline is built; given, it is checked against them.
    """

    type: str = "transformer"
    targets: dict[str, list[int]] | None = None
    hidden_dim: int = 512
    num_layers: int = 2  # decoder layers (the learned queries attend to the signal states)
    num_heads: int = 8
    dropout: float = 0.0
    # Encoder layers run over the signal states before the decoder reads them (nn.Transformer's
    # encoder stack, with its own final LayerNorm); 0 = decoder only.
    num_encoder_layers: int = 0
    ffn_dim: int | None = None  # feed-forward width of every layer; default 4 * hidden_dim
    # Add each signal token's input embedding to its hidden state before projecting (NExT-GPT).
    add_token_embeddings: bool = False
    # Which of the LLM's hidden states the projector reads, indexed as transformers' ``hidden_states``
    # (1 = after the first decoder layer, -1 = the last, after the final norm; 0, the input embeddings, is
    # not allowed): NExT-GPT's ``text_emb_to_<modality>_layers`` with one entry, [-1] in its release.
    hidden_layer: int = -1

    def __post_init__(self) -> None:
        if self.targets is not None:
            if not isinstance(self.targets, dict) or not self.targets:
                raise ValueError("output_projector.targets must name at least one conditioning tensor "
                                 "({name: [sequence_length, dim]}), or be left out to take the generator's")
            for name, shape in self.targets.items():
                if not (isinstance(shape, (list, tuple)) and len(shape) == 2
                        and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= lim
                                for s, lim in zip(shape, (SIZE_LIMITS["sequence_length"], SIZE_LIMITS["hidden_dim"])))):
                    raise ValueError(f"output_projector.targets[{name}] must be [sequence_length, dim] (at most "
                                     f"{SIZE_LIMITS['sequence_length']} and {SIZE_LIMITS['hidden_dim']}), got {shape!r}")
            self.targets = {k: [int(s) for s in v] for k, v in self.targets.items()}
        positive_int("output_projector.hidden_dim", self.hidden_dim, limit=SIZE_LIMITS["hidden_dim"])
        positive_int("output_projector.num_layers", self.num_layers, limit=SIZE_LIMITS["num_layers"])
        positive_int("output_projector.num_heads", self.num_heads, limit=SIZE_LIMITS["num_heads"])
        if not isinstance(self.num_encoder_layers, int) or isinstance(self.num_encoder_layers, bool) \
                or not 0 <= self.num_encoder_layers <= SIZE_LIMITS["num_encoder_layers"]:
            raise ValueError(f"output_projector.num_encoder_layers must be an integer from 0 to "
                             f"{SIZE_LIMITS['num_encoder_layers']}, got {self.num_encoder_layers!r}")
        if self.ffn_dim is not None:
            positive_int("output_projector.ffn_dim", self.ffn_dim, limit=SIZE_LIMITS["ffn_dim"])
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"output_projector.hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if not isinstance(self.hidden_layer, int) or isinstance(self.hidden_layer, bool) or self.hidden_layer == 0:
            raise ValueError(f"output_projector.hidden_layer must be a non-zero integer (1 = after the LLM's first "
                             f"decoder layer, -1 = its last), got {self.hidden_layer!r}")


@dataclass
class GeneratorConfig:
    """A diffusers pipeline adapter: from ``pretrained`` (hub id or local dir) or random init from ``components``."""

    type: str = "stable-diffusion"
    pretrained: str | None = None
    components: dict[str, Any] | None = None  # per-component config dicts for a randomly initialised pipeline
    dtype: str = "float32"
    lazy: bool = False  # load on first use instead of at pipeline load
    cpu_offload: bool = False  # diffusers' enable_model_cpu_offload (needs accelerate and a GPU)
    settings: dict[str, Any] = field(default_factory=dict)  # default generation settings for this modality

    def __post_init__(self) -> None:
        # Neither is allowed: a generator type with nothing to load (a plugin's parameter-free renderer)
        # needs no `components: {}`; the diffusers generators say themselves that they need one of them.
        if self.pretrained is not None and self.components is not None:
            raise ValueError("generator: give generator.pretrained or generator.components, not both (exactly one of "
                             "them for a diffusers generator)")
        _check_dtype("generator.dtype", self.dtype)


@dataclass
class AnyModalConfig:
    """The whole system: encoders, input projectors, LLM, output projectors and generators."""

    llm: LLMConfig
    name: str = "anymodal"
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    input_projectors: dict[Modality, InputProjectorConfig] = field(default_factory=dict)
    output_projectors: dict[Modality, OutputProjectorConfig] = field(default_factory=dict)
    generators: dict[Modality, GeneratorConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_projectors = {_media_modality("input_projectors", k): v for k, v in self.input_projectors.items()}
        self.output_projectors = {_media_modality("output_projectors", k): v for k, v in self.output_projectors.items()}
        self.generators = {_media_modality("generators", k): v for k, v in self.generators.items()}
        for m, p in list(self.input_projectors.items()):
            if p.share is None:
                continue
            owner = self.input_projectors.get(p.share)
            if owner is None or owner.share is not None or p.share is m:
                raise ValueError(f"input_projectors[{m.value}].share must name another modality's input projector "
                                 f"that is not itself shared; got {p.share.value!r}")
            self.input_projectors[m] = dataclasses.replace(owner, share=p.share)
        served: dict[Modality, str] = {}
        for name, enc in self.encoders.items():
            for m in enc.modalities:
                if m in served:
                    raise ValueError(f"encoders: modality {m.value!r} is served by both {served[m]!r} and {name!r}")
                served[m] = name
        for m in self.input_projectors:
            if m not in served:
                raise ValueError(f"input_projectors[{m.value}] has no encoder; add {m.value!r} to an encoder's modalities")
        for m in self.generators:
            if m not in self.output_projectors:
                raise ValueError(f"generators[{m.value}] needs output_projectors[{m.value}]")
            if m not in self.llm.signal_tokens:
                raise ValueError(f"generators[{m.value}] needs llm.signal_tokens[{m.value}]")
        for m in self.output_projectors:
            if m not in self.generators:
                raise ValueError(f"output_projectors[{m.value}] has no generators[{m.value}]")

    # ------------------------------------------------------------------ I/O
    @property
    def input_modalities(self) -> list[Modality]:
        return list(self.input_projectors)

    @property
    def output_modalities(self) -> list[Modality]:
        return list(self.generators)

    def encoder_for(self, modality: Modality) -> str:
        for name, enc in self.encoders.items():
            if modality in enc.modalities:
                return name
        raise ValueError(f"no encoder serves {modality.value!r}; configured: {', '.join(self.encoders) or '(none)'}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnyModalConfig":
        return _build(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "AnyModalConfig":
        return load_yaml_dataclass(cls, path, "config")

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from .utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_yaml_dataclass(cls: Any, path: str | os.PathLike, kind: str, **overrides: Any) -> Any:
    """``cls.from_dict`` of a YAML file, with errors that name the file (and the field)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data  # an empty file means "all defaults"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {kind} must be a YAML mapping, got {type(data).__name__}")
    data.update(overrides)
    try:
        return cls.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _plain(obj: Any) -> Any:
    """Turn enums/tuples into YAML/JSON-safe values."""
    if isinstance(obj, dict):
        return {(k.value if isinstance(k, Modality) else k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Modality):
        return obj.value
    return obj


def _build(tp: Any, data: Any, where: str) -> Any:
    """Build ``tp`` (a dataclass, dict/list of them, or a plain type) from YAML data, strictly."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} in {where}; allowed: {', '.join(sorted(names))}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"{where}: {e}") from None
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = typing.get_args(tp)
        if data is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where} must not be empty")
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], data, where) if len(inner) == 1 else data
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        _, vt = typing.get_args(tp)
        return {k: _build(vt, v, f"{where}[{k}]") for k, v in data.items()}
    if origin is list:
        if not isinstance(data, list):
            raise ValueError(f"{where} must be a list, got {type(data).__name__}")
        (it,) = typing.get_args(tp)
        return [_build(it, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if tp is Any or data is None:
        return data
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if tp in (int, float, str, bool):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            raise ValueError(f"{where} must be {tp.__name__}, got {data!r}")
        if tp is float and not math.isfinite(data):  # YAML's .nan/.inf: no setting is meant to be one
            raise ValueError(f"{where} must be a finite number, got {data!r}")
        return data
    if tp is Modality:
        return Modality.parse(data)
    return data
