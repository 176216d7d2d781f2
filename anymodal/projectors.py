"""Input projectors (encoder features -> LLM embeddings) and output projectors
(signal-token hidden states -> generator conditioning), each in a registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import InputProjectorConfig, OutputProjectorConfig
from .registry import INPUT_PROJECTORS, OUTPUT_PROJECTORS, register_input_projector, register_output_projector


def _check_features(features: torch.Tensor, in_tokens: int, in_dim: int, who: str) -> None:
    if features.ndim != 3 or features.shape[1] != in_tokens or features.shape[2] != in_dim:
        raise ValueError(f"{who} expects features of shape (batch, {in_tokens}, {in_dim}), got {tuple(features.shape)}")


class _TokenMapper(nn.Module):
    """Shared shape logic of the linear and MLP projectors.

    With as many input tokens as output tokens the network maps each token. With one pooled
    input (ImageBind's embedding) and ``num_tokens > 1`` it widens the output and splits it
    into ``num_tokens`` positions, as NExT-GPT-style linear projectors do.
    """

    def __init__(self, in_tokens: int, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        if in_tokens != num_tokens and in_tokens != 1:
            raise ValueError(f"input projector: cannot map {in_tokens} feature tokens to num_tokens={num_tokens}; "
                             "use num_tokens equal to the encoder's tokens, a pooled (1-token) encoder, or 'qformer'")
        self.in_tokens, self.in_dim, self.out_dim, self.num_tokens = in_tokens, in_dim, out_dim, num_tokens
        self.expand = num_tokens if in_tokens == 1 else 1

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], self.num_tokens, self.out_dim)


@register_input_projector("linear")
class LinearProjector(_TokenMapper):
    def __init__(self, in_tokens: int, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__(in_tokens, in_dim, out_dim, config.num_tokens)
        self.proj = nn.Linear(in_dim, out_dim * self.expand)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.in_tokens, self.in_dim, "linear projector")
        return self._finish(self.proj(features))


@register_input_projector("mlp")
class MLPProjector(_TokenMapper):
    def __init__(self, in_tokens: int, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__(in_tokens, in_dim, out_dim, config.num_tokens)
        hidden = config.hidden_dim or out_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        for _ in range(config.num_layers - 2):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        layers += [nn.GELU(), nn.Linear(hidden, out_dim * self.expand)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.in_tokens, self.in_dim, "mlp projector")
        return self._finish(self.net(features))


@dataclass
class QFormerOptions:
    """``options`` of the ``qformer`` input projector.

    ``config``: Q-Former config kwargs (``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig``). The
    geometry comes from ``config`` when given, else from a BLIP-2 / InstructBLIP ``pretrained``
    checkpoint, else from ``hidden_dim``/``num_layers``/``num_heads`` and ``cross_attention_frequency``
    (a cross-attention block every n layers; BLIP-2 uses 2). ``instruction``: InstructBLIP's
    instruction-aware Q-Former, which also reads the prompt through ``tokenizer`` (its own
    tokenizer: a directory or ``bytes``; default: the checkpoint's ``qformer_tokenizer``).
    ``pretrained_projection``: false loads only the queries and the Q-Former from ``pretrained`` and
    starts the projection to the LLM fresh (MiniGPT-4/5 put a new linear layer on BLIP-2's Q-Former).
    """

    config: dict[str, Any] | None = None
    cross_attention_frequency: int = 1
    instruction: bool = False
    tokenizer: str | None = None
    pretrained_projection: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("input_projector.options.cross_attention_frequency", self.cross_attention_frequency)
        if not isinstance(self.instruction, bool):
            raise ValueError(f"input_projector.options.instruction must be true or false, got {self.instruction!r}")
        if self.config is not None and not isinstance(self.config, dict):
            raise ValueError("input_projector.options.config must be a mapping of Q-Former config fields")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@register_input_projector("qformer")
class QFormerProjector(nn.Module):
    """BLIP-2's Q-Former: learned queries cross-attend to the features, then a linear map to the LLM.

    The modules are transformers' own (``Blip2QFormerModel``, or ``InstructBlipQFormerModel`` when
    ``options.instruction``), under the names BLIP-2 checkpoints use, so released weights load as they are.
    The instruction-aware variant concatenates the instruction's tokens after the queries, as
    InstructBLIP does, and keeps the query positions of the output.
    """

    takes_options = True  # QFormerOptions

    def __init__(self, in_tokens: int, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__()
        import transformers

        opts = QFormerOptions(**_known_options(config.options, QFormerOptions, "qformer"))
        self.in_tokens, self.in_dim = in_tokens, in_dim
        self.takes_instruction = opts.instruction
        self.fresh_keys = () if opts.pretrained_projection else ("proj.",)  # not read from `pretrained`
        if opts.config is not None:
            fields = dict(opts.config)
        elif config.pretrained is not None and not str(config.pretrained).endswith(".safetensors"):
            from .hf_systems import qformer_geometry

            fields, queries, kind = qformer_geometry(config.pretrained)
            if queries != config.num_tokens:
                raise ValueError(f"input_projector: {config.pretrained} has {queries} query tokens, but num_tokens is "
                                 f"{config.num_tokens}; set num_tokens: {queries}")
            if (kind == "instructblip") != opts.instruction:
                raise ValueError(f"input_projector: a {kind} Q-Former needs options.instruction: "
                                 f"{str(kind == 'instructblip').lower()}")
            # recorded, so that a saved pipeline rebuilds this geometry without the checkpoint
            config.options = {**config.options, "config": fields}
        else:
            hidden = config.hidden_dim or 768
            if hidden % config.num_heads:
                raise ValueError(f"input_projector.hidden_dim ({hidden}) must be divisible by num_heads "
                                 f"({config.num_heads})")
            fields = dict(hidden_size=hidden, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                          intermediate_size=4 * hidden, cross_attention_frequency=opts.cross_attention_frequency)
        fields.setdefault("encoder_hidden_size", in_dim)
        if fields["encoder_hidden_size"] != in_dim:
            raise ValueError(f"input_projector: the Q-Former attends to features of width {fields['encoder_hidden_size']},"
                             f" but the encoder gives {in_dim}")
        prefix = "InstructBlip" if opts.instruction else "Blip2"
        qcfg = getattr(transformers, f"{prefix}QFormerConfig")(**fields)
        hidden = qcfg.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_tokens, hidden) * 0.02)
        self.qformer = getattr(transformers, f"{prefix}QFormerModel")(qcfg)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, features: torch.Tensor, instruction: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        _check_features(features, self.in_tokens, self.in_dim, "qformer projector")
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        if not self.takes_instruction:
            out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
            return self.proj(out)
        if instruction is None:
            raise ValueError("this Q-Former reads the instruction (InstructBLIP): pass instruction="
                             "{'input_ids', 'attention_mask'} from its tokenizer, one row per medium")
        ids, mask = instruction["input_ids"].to(features.device), instruction["attention_mask"].to(features.device)
        if ids.shape[0] != features.shape[0]:
            raise ValueError(f"qformer projector: {ids.shape[0]} instructions for {features.shape[0]} media")
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = self.qformer(input_ids=ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=features).last_hidden_state
        return self.proj(out[:, : queries.shape[1]])


def _known_options(options: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - allowed)
    if unknown:
        raise ValueError(f"input_projector ({where}) options: unknown field {unknown[0]!r}; allowed: "
                         f"{', '.join(sorted(allowed))}")
    return dict(options or {})


@register_output_projector("transformer")
class TransformerOutputProjector(nn.Module):
    """NExT-GPT's output projector: learned queries attend to the signal tokens' hidden states.

    One query set and stack per conditioning target (``prompt_embeds``, and for AudioLDM2 also
    ``generated_prompt_embeds``), each producing ``(batch, sequence, dim)``. With
    ``num_encoder_layers > 0`` each target runs ``nn.Transformer``'s encoder-decoder (pre-norm,
    a final LayerNorm on each stack) over the projected signal states; with 0, the decoder alone.
    With ``add_token_embeddings`` the signal tokens' input embeddings are added to their hidden
    states first (``forward``'s ``token_embeds``).
    """

    def __init__(self, in_dim: int, config: OutputProjectorConfig):
        super().__init__()
        self.in_dim = in_dim
        self.add_token_embeddings = config.add_token_embeddings
        self.targets = {name: tuple(shape) for name, shape in config.targets.items()}
        h = config.hidden_dim
        ffn = config.ffn_dim or 4 * h
        self.in_proj = nn.Linear(in_dim, h)
        self.queries = nn.ParameterDict({n: nn.Parameter(torch.randn(seq, h) * 0.02)
                                         for n, (seq, _) in self.targets.items()})
        if config.num_encoder_layers:
            self.encoders = nn.ModuleDict({
                n: nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(h, config.num_heads, dim_feedforward=ffn, dropout=config.dropout,
                                               batch_first=True, norm_first=True),
                    num_layers=config.num_encoder_layers, norm=nn.LayerNorm(h), enable_nested_tensor=False)
                for n in self.targets})
        else:
            self.encoders = None
        self.decoders = nn.ModuleDict({
            n: nn.TransformerDecoder(
                nn.TransformerDecoderLayer(h, config.num_heads, dim_feedforward=ffn, dropout=config.dropout,
                                           batch_first=True, norm_first=True),
                num_layers=config.num_layers, norm=nn.LayerNorm(h))
            for n in self.targets})
        self.out_proj = nn.ModuleDict({n: nn.Linear(h, dim) for n, (_, dim) in self.targets.items()})

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if hidden.ndim != 3 or hidden.shape[-1] != self.in_dim:
            raise ValueError(f"output projector expects hidden states (batch, signal_tokens, {self.in_dim}), "
                             f"got {tuple(hidden.shape)}")
        if self.add_token_embeddings:
            if token_embeds is None:
                raise ValueError("this output projector adds the signal tokens' input embeddings "
                                 "(add_token_embeddings); pass token_embeds")
            if token_embeds.shape[-2:] != hidden.shape[-2:]:
                raise ValueError(f"token_embeds {tuple(token_embeds.shape)} do not match the hidden states "
                                 f"{tuple(hidden.shape)}")
            hidden = hidden + token_embeds
        memory = self.in_proj(hidden)
        out = {}
        for n in self.targets:
            mem = self.encoders[n](memory) if self.encoders is not None else memory
            q = self.queries[n].unsqueeze(0).expand(hidden.shape[0], -1, -1)
            out[n] = self.out_proj[n](self.decoders[n](q, mem))
        return out


def build_input_projector(config: InputProjectorConfig, in_tokens: int, in_dim: int, out_dim: int) -> nn.Module:
    cls = INPUT_PROJECTORS.get(config.type)
    if config.options and not getattr(cls, "takes_options", False):  # a typo must not pass silently
        raise ValueError(f"input projector type {config.type!r} takes no options; got {', '.join(sorted(config.options))}")
    return cls(in_tokens, in_dim, out_dim, config)


def build_output_projector(config: OutputProjectorConfig, in_dim: int) -> nn.Module:
    if config.targets is None:
        raise ValueError("output_projector.targets is not set: build the model through AnyModalPipeline, which takes "
                         "it from the generator, or give targets: {name: [sequence_length, dim]}")
    return OUTPUT_PROJECTORS.get(config.type)(in_dim, config)
