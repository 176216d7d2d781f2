"""Random-init builders: a generator's diffusers pipeline made from the plain dicts of
``GeneratorConfig.components``, for tests and for training small generators here.

Each generator type has one builder, registered under its type name with
:func:`register_random_init`: ``builder(specs, where) -> dict`` returns the keyword arguments of the
generator's pipeline class. ``DiffusersGenerator`` looks the builder up (:func:`random_init_builder`),
checks the keys of ``components`` against the generator's ``required_components`` and
``optional_components`` first, and calls it inside ``seeded(components.seed)``. Parts are built in a
fixed order, which fixes what each draws from the seed: a config builds the same weights every time.

Tokenizers are built in memory (:func:`byte_tokenizer`), so nothing is downloaded. transformers
configs accept any keyword, so the keys of every spec are checked against the constructor first
and a typo is an error naming it.
"""

from __future__ import annotations

import contextlib
import inspect
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from anymodal.checks import check_keys
from anymodal.utils import seeded as utils_seeded

from .shapes import cross_attention_width

Builder = Callable[[dict[str, Any], str], dict[str, Any]]

TOKENIZER_KINDS = ("clip", "roberta", "t5")
_BYTES = "bytes"
_BUILDERS: dict[str, Builder] = {}

# The mean/std the CLIP image processors use; SD-2.1-unCLIP ships its feature extractor with them.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------- the builders' registry
def register_random_init(type_name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(specs, where) -> pipeline kwargs`` as the random init of generator type ``type_name``."""
    def add(builder: Builder) -> Builder:
        if type_name in _BUILDERS and _BUILDERS[type_name] is not builder:
            raise ValueError(f"a random-init builder for generator type {type_name!r} is already registered")
        _BUILDERS[type_name] = builder
        return builder

    return add


def random_init_builder(generator_class: type) -> Builder:
    """The builder of ``generator_class``'s type, else of the nearest base class that has one (a
    subclass that only changes how the pipeline is called builds the same parts)."""
    for klass in generator_class.__mro__:
        name = klass.__dict__.get("type_name")
        if name in _BUILDERS:
            return _BUILDERS[name]
    raise ValueError(f"generator type {generator_class.type_name!r} has no random-init builder, so it cannot be "
                     f"built from `components`; give `pretrained` instead (types with one: "
                     f"{', '.join(sorted(_BUILDERS))}; anymodal.generators.random_init.register_random_init adds one)")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for a deterministic random init without disturbing the caller's RNG state."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"components.seed must be an integer, got {seed!r}")
    with utils_seeded(seed):
        yield


# --------------------------------------------------------------------------- spec checking
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
    """``config_cls(**defaults, **spec)``, the keys of ``spec`` checked against the config's constructor."""
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


def check_same_size(where: str, *pairs: tuple[str, Any]) -> None:
    """Raise when two configs that must agree on a width disagree (e.g. UNet vs text encoder)."""
    values = [(n, v) for n, v in pairs if v is not None]
    if len({v for _, v in values}) > 1:
        listed = ", ".join(f"{n}={v}" for n, v in values)
        raise ValueError(f"{where}: these sizes must agree: {listed}")


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


# --------------------------------------------------------------------------- parts several types share
def build_clip_text(specs: dict[str, Any], where: str) -> dict[str, Any]:
    """``tokenizer`` (CLIP) and, when ``text_encoder`` is given, a ``CLIPTextModel`` (else None)."""
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


def build_denoiser_components(specs: dict[str, Any], where: str, unet_class: type,
                              **extra_classes: type) -> dict[str, Any]:
    """The parts every CLIP-conditioned diffusers pipeline shares, built in this order: tokenizer and
    text encoder, the UNet (``unet_class``), each of ``extra_classes`` (part name -> class, e.g. a
    motion adapter), the VAE and the scheduler. The text width is checked against the UNet's."""
    from diffusers import AutoencoderKL

    parts = build_clip_text(specs, where)
    parts["unet"] = build_with_kwargs(f"{where}.unet", unet_class, specs["unet"])
    for name, klass in extra_classes.items():
        parts[name] = build_with_kwargs(f"{where}.{name}", klass, specs[name])
    parts["vae"] = build_with_kwargs(f"{where}.vae", AutoencoderKL, specs["vae"])
    parts["scheduler"] = build_scheduler(f"{where}.scheduler", specs["scheduler"])
    if parts["text_encoder"] is not None:
        check_same_size(where, ("text_encoder.hidden_size", parts["text_encoder"].config.hidden_size),
                        ("unet.cross_attention_dim", cross_attention_width(parts["unet"].config, where)))
    return parts


def roberta_tokenizer(specs: dict[str, Any], text_spec: Any, where: str) -> Any:
    """CLAP's tokenizer. Its text tower is a RoBERTa: positions start after the padding index, so a
    ``max_position_embeddings`` of N leaves N - 2 token positions."""
    positions = as_mapping(f"{where}.text_encoder", text_spec).get("max_position_embeddings", 514)
    return build_tokenizer(f"{where}.tokenizer", "roberta", specs["tokenizer"], positions - 2)


def check_roberta_positions(where: str, text_config: Any, tokenizer: Any) -> None:
    check_vocab(where, text_config, tokenizer)
    if text_config.max_position_embeddings < tokenizer.model_max_length + 2:
        raise ValueError(f"{where}.max_position_embeddings ({text_config.max_position_embeddings}) must be at least "
                         f"the tokenizer's model_max_length + 2 ({tokenizer.model_max_length + 2}) for a RoBERTa-style "
                         "text encoder")


def build_hifigan_vocoder(spec: Any, where: str) -> Any:
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    return build_transformers_model(where, SpeechT5HifiGan, SpeechT5HifiGanConfig, spec)


# --------------------------------------------------------------------------- one builder per generator type
@register_random_init("stable-diffusion")
def build_stable_diffusion(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    parts = build_denoiser_components(specs, where, UNet2DConditionModel)
    # A random-init pipeline has nothing to screen; real checkpoints keep whatever they ship.
    parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


@register_random_init("text-to-video")
def build_text_to_video(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from diffusers import UNet3DConditionModel

    return build_denoiser_components(specs, where, UNet3DConditionModel)


@register_random_init("animatediff")
def build_animatediff(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from diffusers import MotionAdapter, UNet2DConditionModel

    parts = build_denoiser_components(specs, where, UNet2DConditionModel, motion_adapter=MotionAdapter)
    parts.update(feature_extractor=None, image_encoder=None)
    return parts


@register_random_init("stable-unclip")
def build_stable_unclip(specs: dict[str, Any], where: str) -> dict[str, Any]:
    """The SD parts, the image-noising scheduler, a CLIP image encoder, and the image normalizer
    (identity at init) and feature extractor built to match the encoder."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    parts = build_denoiser_components(specs, where, UNet2DConditionModel)
    unet = parts["unet"]
    if unet.config.class_embed_type != "projection":
        raise ValueError(f"{where}.unet.class_embed_type must be 'projection' (unCLIP feeds the image embedding "
                         f"as a class embedding), got {unet.config.class_embed_type!r}")
    parts["image_noising_scheduler"] = build_scheduler(f"{where}.image_noising_scheduler",
                                                       specs["image_noising_scheduler"])
    encoder = build_transformers_model(f"{where}.image_encoder", CLIPVisionModelWithProjection, CLIPVisionConfig,
                                       specs["image_encoder"])
    dim = encoder.config.projection_dim
    check_same_size(where, ("unet.projection_class_embeddings_input_dim",
                            unet.config.projection_class_embeddings_input_dim),
                    ("2 x image_encoder.projection_dim", 2 * dim))
    size = encoder.config.image_size
    parts.update(
        image_encoder=encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=dim),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                             image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    )
    return parts


@register_random_init("audioldm")
def build_audioldm(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    tokenizer = roberta_tokenizer(specs, specs["text_encoder"], where)
    text_encoder = build_transformers_model(f"{where}.text_encoder", ClapTextModelWithProjection, ClapTextConfig,
                                            specs["text_encoder"], defaults=tokenizer_token_ids(tokenizer))
    check_roberta_positions(f"{where}.text_encoder", text_encoder.config, tokenizer)
    unet = build_with_kwargs(f"{where}.unet", UNet2DConditionModel, specs["unet"])
    if unet.config.class_embed_type != "simple_projection":
        raise ValueError(f"{where}.unet.class_embed_type must be 'simple_projection' (AudioLDM feeds the CLAP "
                         f"embedding as a class embedding), got {unet.config.class_embed_type!r}")
    check_same_size(where, ("text_encoder.projection_dim", text_encoder.config.projection_dim),
                    ("unet.projection_class_embeddings_input_dim",
                     unet.config.projection_class_embeddings_input_dim))
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "vae": build_with_kwargs(f"{where}.vae", AutoencoderKL, specs["vae"]),
        "scheduler": build_scheduler(f"{where}.scheduler", specs["scheduler"]),
        "vocoder": build_hifigan_vocoder(specs["vocoder"], f"{where}.vocoder"),
    }


def _build_clap(specs: dict[str, Any], where: str) -> dict[str, Any]:
    """AudioLDM 2's RoBERTa tokenizer and CLAP model, text and audio towers (the pipeline calls
    ``ClapModel.get_text_features``)."""
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    clap = as_mapping(f"{where}.text_encoder", specs["text_encoder"])
    check_keys(f"{where}.text_encoder", clap, ["text_config", "audio_config", "projection_dim"])
    text_spec = as_mapping(f"{where}.text_encoder.text_config", clap.get("text_config"))
    audio_spec = as_mapping(f"{where}.text_encoder.audio_config", clap.get("audio_config"))
    tokenizer = roberta_tokenizer(specs, text_spec, where)
    text_config = build_transformers_config(f"{where}.text_encoder.text_config", ClapTextConfig, text_spec,
                                            defaults=tokenizer_token_ids(tokenizer))
    audio_config = build_transformers_config(f"{where}.text_encoder.audio_config", ClapAudioConfig, audio_spec)
    check_roberta_positions(f"{where}.text_encoder.text_config", text_config, tokenizer)
    extra = {"projection_dim": clap["projection_dim"]} if "projection_dim" in clap else {}
    text_encoder = ClapModel(ClapConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(),
                                        **extra))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder}


def _build_t5(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from transformers import T5Config, T5EncoderModel

    t5_spec = as_mapping(f"{where}.text_encoder_2", specs["text_encoder_2"])
    tokenizer_2 = build_tokenizer(f"{where}.tokenizer_2", "t5", specs["tokenizer_2"], 512)
    text_encoder_2 = build_transformers_model(f"{where}.text_encoder_2", T5EncoderModel, T5Config, t5_spec,
                                              defaults=tokenizer_token_ids(tokenizer_2))
    check_vocab(f"{where}.text_encoder_2", text_encoder_2.config, tokenizer_2)
    return {"tokenizer_2": tokenizer_2, "text_encoder_2": text_encoder_2}


def _build_gpt2(specs: dict[str, Any], where: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    lm_spec = as_mapping(f"{where}.language_model", specs["language_model"])
    if "max_new_tokens" not in lm_spec:
        raise ValueError(f"{where}.language_model needs 'max_new_tokens' (the length of generated_prompt_embeds)")
    # GPT-2 only ever sees inputs_embeds here, so its token ids are irrelevant; pin them inside
    # the (small) vocabulary so transformers does not warn about ids out of range.
    # GPT2LMHeadModel, not GPT2Model: the pipeline drives it with GenerationMixin helpers.
    return build_transformers_model(f"{where}.language_model", GPT2LMHeadModel, GPT2Config, lm_spec,
                                    defaults={"bos_token_id": 0, "eos_token_id": 0}, extra_keys=["max_new_tokens"])


@register_random_init("audioldm2")
def build_audioldm2(specs: dict[str, Any], where: str) -> dict[str, Any]:
    from diffusers import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL
    from transformers import ClapFeatureExtractor

    clap = _build_clap(specs, where)
    t5 = _build_t5(specs, where)
    parts = {
        **clap,
        **t5,
        "language_model": _build_gpt2(specs, where),
        "projection_model": build_with_kwargs(f"{where}.projection_model", AudioLDM2ProjectionModel,
                                              specs["projection_model"]),
        "unet": build_with_kwargs(f"{where}.unet", AudioLDM2UNet2DConditionModel, specs["unet"]),
        "vae": build_with_kwargs(f"{where}.vae", AutoencoderKL, specs["vae"]),
        "scheduler": build_scheduler(f"{where}.scheduler", specs["scheduler"]),
        "vocoder": build_hifigan_vocoder(specs["vocoder"], f"{where}.vocoder"),
        "feature_extractor": None,
    }
    if "feature_extractor" in specs:
        fe_spec = as_mapping(f"{where}.feature_extractor", specs["feature_extractor"])
        parts["feature_extractor"] = build_with_kwargs(f"{where}.feature_extractor", ClapFeatureExtractor, fe_spec)
    return parts
