"""AnyModalModel: holds the encoders, projectors and language model, and wires media
features into the LLM's input embeddings and signal-token states out to conditioning."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AnyModalConfig, LLMConfig
from .loading import allow_pickle, missing_keys_error
from .modality import Modality
from .projectors import build_input_projector, build_output_projector
from .registry import ENCODERS
from .utils import quiet_loading, small_local_dir, torch_dtype

logger = logging.getLogger(__name__)


def load_language_model(cfg: LLMConfig, path: str | None = None) -> nn.Module:
    """Any ``AutoModelForCausalLM``: from a saved directory, ``cfg.model`` (id/path), or random init."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(cfg.dtype)
    source = path or cfg.model
    if source is not None and path is None and cfg.gguf_file is None:
        from .hf_systems import HF_SYSTEMS, load_composite_language_model, model_type_of

        if model_type_of(source) in HF_SYSTEMS:  # LLaVA / BLIP-2 / InstructBLIP: the LM inside
            return load_composite_language_model(source, dtype)
    if source is not None:
        from .lowmem import cast_in_place, stored_dtype, weight_shards

        # A dtype other than the stored one is converted here, tensor by tensor, from the mapped
        # checkpoint: transformers' own conversion holds the source and the copy (2x the model).
        stored = stored_dtype(source) if cfg.gguf_file is None else None
        load_dtype = stored if stored is not None and stored != dtype else dtype
        kwargs: dict[str, Any] = {"dtype": load_dtype, "output_loading_info": True}
        if cfg.gguf_file and path is None:
            kwargs["gguf_file"] = cfg.gguf_file  # GGUF holds plain tensors, no pickle
        else:
            from .hf_systems import check_folder

            check_folder(source)  # JSON named when broken, weight index inside, pickle refused unless allowed
            kwargs["use_safetensors"] = None if allow_pickle() else True  # None: safetensors first, else pickle
        from .loading import library_errors

        with library_errors(f"cannot load the language model from {source}", source):
            try:
                with quiet_loading(show_bars=not small_local_dir(source)):
                    model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            except SafetensorError as e:
                raise ValueError(f"cannot load the language model from {source}: a weights file is not a complete "
                                 f"safetensors file ({e})") from None
        missing_keys_error(info, source, "the language model")
        if load_dtype != dtype:
            cast_in_place(model, dtype, weight_shards(source).values())
        return model
    options = dict(cfg.config)
    model_type = options.pop("model_type")
    check_config_keys(model_type, options)
    hf_config = AutoConfig.for_model(model_type, **options)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def check_config_keys(model_type: str, options: dict[str, Any]) -> None:
    """Refuse ``llm.config`` keys the transformers config class does not know (``hiden_size``), which
    ``AutoConfig`` would silently keep as unused attributes."""
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"llm.config.model_type {model_type!r} is not a transformers model type") from None
    known = set(cls().to_dict()) | set(PretrainedConfig().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= {p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")}
    unknown = sorted(set(options) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"llm.config: unknown key {unknown[0]!r} for model_type {model_type!r} "
                         f"({cls.__name__}){hint}")


def load_tokenizer(cfg: LLMConfig):
    from .tokenization import byte_level_tokenizer, load_tokenizer_from

    name = cfg.tokenizer or cfg.model
    if name == "bytes":
        return byte_level_tokenizer()
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and cfg.tokenizer is None else {}
    if name is not None and os.path.isdir(name):
        from .loading import read_json

        for f in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "config.json"):
            if (Path(name) / f).is_file():  # else transformers says "Expecting value" without naming the file
                read_json(Path(name) / f, "tokenizer")
    from .loading import library_errors

    with library_errors(f"cannot load the tokenizer from {name}"):
        return load_tokenizer_from(name, cfg.tokenizer_backend, "llm.tokenizer", **kwargs)


def _check_projector_sizes(config: AnyModalConfig, language_model: nn.Module, encoders: dict[str, nn.Module]) -> None:
    """Each input projector with ``pretrained`` weights, built on the meta device (no memory) and its
    shapes compared with the checkpoint's headers, before the real one is allocated: a Q-Former
    config that asks for more than the checkpoint holds fails here, not after minutes of allocation."""
    from .hf_systems import load_projector_weights

    hidden = language_model.config.get_text_config().hidden_size
    for m, pcfg in config.input_projectors.items():
        if pcfg.pretrained is None or pcfg.share is not None:
            continue
        tokens, dim = encoders[config.encoder_for(m)].feature_shape(m)
        with torch.device("meta"):
            meta = build_input_projector(pcfg, tokens, dim, hidden)
        load_projector_weights(meta, pcfg.type, pcfg.pretrained, f"input_projectors.{m.value}")


@dataclass(frozen=True)
class TokenIds:
    """The ids the model needs from the vocabulary: each input medium's placeholder, each generated
    medium's signal tokens, and the vocabulary's size (the embedding grows to it). The processor
    makes them from its tokenizer (:meth:`anymodal.processor.AnyModalProcessor.token_ids`); the
    model needs nothing else of the tokenizer, so it builds without a processor."""

    placeholder: dict[Modality, int]
    signal: dict[Modality, list[int]]
    vocab_size: int


class AnyModalModel(nn.Module):
    """Encoders (``ModuleDict`` by name), input/output projectors (by modality) and an LLM."""

    def __init__(self, config: AnyModalConfig, language_model: nn.Module, encoders: dict[str, nn.Module],
                 token_ids: TokenIds):
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.encoders = nn.ModuleDict(encoders)
        self.signal_ids = {m: list(v) for m, v in token_ids.signal.items()}
        self.placeholder_ids = dict(token_ids.placeholder)
        hidden = self.llm_config.hidden_size
        self.input_projectors = nn.ModuleDict()
        for m, pcfg in config.input_projectors.items():
            tokens, dim = self.encoder_for(m).feature_shape(m)
            if pcfg.share is not None:  # built below, once, under the owner's key
                continue
            self.input_projectors[m.value] = build_input_projector(pcfg, tokens, dim, hidden)
        for m, pcfg in config.input_projectors.items():
            if pcfg.share is not None:
                shape, owner = self.encoder_for(m).feature_shape(m), self.encoder_for(pcfg.share).feature_shape(pcfg.share)
                if shape != owner:
                    raise ValueError(f"input_projectors[{m.value}].share: {m.value} features {shape} differ from "
                                     f"{pcfg.share.value} features {owner}; a shared projector needs one shape")
                self.input_projectors[m.value] = self.input_projectors[pcfg.share.value]
        self.output_projectors = nn.ModuleDict({
            m.value: build_output_projector(pcfg, hidden) for m, pcfg in config.output_projectors.items()})
        n_layers = self.llm_config.num_hidden_layers
        self.signal_layers: dict[Modality, int] = {}  # index into transformers' hidden_states, 1 .. n_layers
        for m, pcfg in config.output_projectors.items():
            k = pcfg.hidden_layer
            if not (1 <= k <= n_layers or -n_layers <= k <= -1):
                raise ValueError(f"output_projectors[{m.value}].hidden_layer is {k}, but the LLM has {n_layers} "
                                 f"decoder layers: use 1 to {n_layers}, or -1 to -{n_layers} counting from the last")
            self.signal_layers[m] = k if k > 0 else n_layers + 1 + k

    # ------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: AnyModalConfig, token_ids: TokenIds,
              language_model: nn.Module | None = None, encoders: dict[str, nn.Module] | None = None,
              load_projector_weights: bool = True) -> "AnyModalModel":
        """Build from config; components passed in (already loaded from a saved directory) are used as is.

        Input projectors with ``pretrained`` load those weights unless ``load_projector_weights`` is
        false (a saved pipeline loads its own next)."""
        if language_model is None:
            language_model = load_language_model(config.llm)
            add_token_rows(language_model, token_ids.vocab_size)
        if encoders is None:
            encoders = {name: ENCODERS.get(e.type).from_config(e.options, e.modalities, e.pretrained)
                        for name, e in config.encoders.items()}
        if load_projector_weights:
            _check_projector_sizes(config, language_model, encoders)
        model = cls(config, language_model, encoders, token_ids)
        if load_projector_weights:
            from .hf_systems import load_projector_weights as load_weights

            for m, pcfg in config.input_projectors.items():
                if pcfg.pretrained is not None:
                    load_weights(model.input_projectors[m.value], pcfg.type, pcfg.pretrained,
                                 f"input_projectors.{m.value}")
        for name, e in config.encoders.items():
            model.encoders[name].requires_grad_(e.trainable)
        if config.llm.gradient_checkpointing:
            language_model.gradient_checkpointing_enable()
        return model

    @property
    def llm_config(self):
        return self.language_model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    def signal_layer(self, modality: Modality) -> int:
        """The index into transformers' ``hidden_states`` (1 .. num_hidden_layers) whose states the
        output projector of ``modality`` reads (``OutputProjectorConfig.hidden_layer``)."""
        return self.signal_layers[modality]

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers in order (``hidden_states[k]`` is layer ``k - 1``'s output for
        ``k`` below ``num_hidden_layers``; the last entry is the final norm's output)."""
        lm = self.language_model
        n = self.llm_config.num_hidden_layers
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == n:
            return layers
        for mod in lm.modules():  # models that name their stack otherwise (h, blocks, ...)
            if isinstance(mod, nn.ModuleList) and len(mod) == n:
                return mod
        raise ValueError(f"cannot find the {n} decoder layers of {type(lm).__name__} to read a hidden layer from; "
                         f"use output_projectors.<modality>.hidden_layer: -1")

    def encoder_for(self, modality: Modality) -> nn.Module:
        return self.encoders[self.config.encoder_for(modality)]

    # ------------------------------------------------------------ inputs
    def encode_media(self, modality: Modality, inputs: torch.Tensor,
                     instruction: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Preprocessed media -> ``(n, num_tokens, llm_hidden)`` embeddings.

        ``instruction`` (token ids and mask, one row per medium) reaches projectors that read the
        prompt (InstructBLIP's Q-Former: ``takes_instruction``)."""
        if modality.value not in self.input_projectors:
            raise ValueError(f"this model takes no {modality.value} input; it takes "
                             f"{', '.join(self.input_projectors) or 'text only'}")
        encoder = self.encoder_for(modality)
        enc_param = next(encoder.parameters(), None)
        if enc_param is not None:
            inputs = inputs.to(enc_param.device, enc_param.dtype)
        features = encoder(modality, inputs)
        proj = self.input_projectors[modality.value]
        p = next(proj.parameters())
        if getattr(proj, "takes_instruction", False):
            return proj(features.to(p.device, p.dtype), instruction=instruction)
        return proj(features.to(p.device, p.dtype))

    def embed(self, input_ids: torch.Tensor, media: dict[Modality, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with each placeholder position replaced by its medium's features.

        ``media[m]`` holds the projected features of every medium of modality ``m`` in the
        batch, in reading order. Raises when positions and features disagree in number.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        media = media or {}
        for m, pid in self.placeholder_ids.items():
            mask = input_ids == pid
            n_pos = int(mask.sum())
            feats = media.get(m)
            n_feat = 0 if feats is None else feats.shape[0] * feats.shape[1]
            if n_pos != n_feat:
                per = self.config.input_projectors[m].num_tokens if m in self.config.input_projectors else 1
                raise ValueError(f"{m.value}: the prompt has {n_pos} placeholder positions ({n_pos // max(per, 1)} "
                                 f"{m.value}(s) x {per}) but {0 if feats is None else feats.shape[0]} {m.value}(s) "
                                 f"were encoded ({n_feat} positions)")
            if n_pos:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------ outputs
    def project_signal(self, modality: Modality, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signal-token hidden states ``(n, signal_tokens, hidden)`` -> generator conditioning."""
        proj = self.output_projectors[modality.value]
        p = next(proj.parameters())
        if getattr(proj, "add_token_embeddings", False):
            ids = torch.tensor(self.signal_ids[modality], device=self.device)
            embeds = self.language_model.get_input_embeddings()(ids).expand(hidden.shape[0], -1, -1)
            return proj(hidden.to(p.device, p.dtype), embeds.to(p.device, p.dtype))
        return proj(hidden.to(p.device, p.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                media: dict[Modality, torch.Tensor] | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, **kwargs: Any):
        """One LLM forward pass with media scattered into the sequence (training and capture)."""
        embeds = self.embed(input_ids, media)
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, output_hidden_states=output_hidden_states, **kwargs)


def add_token_rows(language_model: nn.Module, vocab_size: int, mean_resizing: bool = True) -> None:
    """Grow (never shrink) the embeddings to ``vocab_size`` rows for the added tokens.

    New rows start around the mean of the old ones; pass ``mean_resizing=False`` when saved
    rows are loaded over them anyway. A tokenizer shorter than the embedding (common: vocabularies
    are padded) keeps every row.
    """
    old = language_model.get_input_embeddings().weight.shape[0]
    if vocab_size > old:
        language_model.resize_token_embeddings(vocab_size, mean_resizing=mean_resizing)
