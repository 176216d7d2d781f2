"""Input projectors (encoder features -> LLM embeddings) and output projectors
(signal-token hidden states -> generator conditioning), each in a registry."""

from __future__ import annotations

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


@register_input_projector("qformer")
class QFormerProjector(nn.Module):
    """BLIP-2's Q-Former (transformers' ``Blip2QFormerModel``): learned queries cross-attend to the features."""

    def __init__(self, in_tokens: int, in_dim: int, out_dim: int, config: InputProjectorConfig):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        hidden = config.hidden_dim or 768
        if hidden % config.num_heads:
            raise ValueError(f"input_projector.hidden_dim ({hidden}) must be divisible by num_heads ({config.num_heads})")
        self.in_tokens, self.in_dim = in_tokens, in_dim
        qcfg = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=config.num_layers,
                                  num_attention_heads=config.num_heads, intermediate_size=4 * hidden,
                                  encoder_hidden_size=in_dim, cross_attention_frequency=1)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_tokens, hidden) * 0.02)
        self.qformer = Blip2QFormerModel(qcfg)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.in_tokens, self.in_dim, "qformer projector")
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        return self.proj(out)


@register_output_projector("transformer")
class TransformerOutputProjector(nn.Module):
    """NExT-GPT's output projector: learned queries attend to the signal tokens' hidden states.

    One decoder per conditioning target (``prompt_embeds``, and for AudioLDM2 also
    ``generated_prompt_embeds``), each producing ``(batch, sequence, dim)``.
    """

    def __init__(self, in_dim: int, config: OutputProjectorConfig):
        super().__init__()
        self.in_dim = in_dim
        self.targets = {name: tuple(shape) for name, shape in config.targets.items()}
        h = config.hidden_dim
        self.in_proj = nn.Linear(in_dim, h)
        self.queries = nn.ParameterDict({n: nn.Parameter(torch.randn(seq, h) * 0.02)
                                         for n, (seq, _) in self.targets.items()})
        self.decoders = nn.ModuleDict({
            n: nn.TransformerDecoder(
                nn.TransformerDecoderLayer(h, config.num_heads, dim_feedforward=4 * h, dropout=config.dropout,
                                           batch_first=True, norm_first=True),
                num_layers=config.num_layers, norm=nn.LayerNorm(h))
            for n in self.targets})
        self.out_proj = nn.ModuleDict({n: nn.Linear(h, dim) for n, (_, dim) in self.targets.items()})

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        if hidden.ndim != 3 or hidden.shape[-1] != self.in_dim:
            raise ValueError(f"output projector expects hidden states (batch, signal_tokens, {self.in_dim}), "
                             f"got {tuple(hidden.shape)}")
        memory = self.in_proj(hidden)
        out = {}
        for n in self.targets:
            q = self.queries[n].unsqueeze(0).expand(hidden.shape[0], -1, -1)
            out[n] = self.out_proj[n](self.decoders[n](q, memory))
        return out


def build_input_projector(config: InputProjectorConfig, in_tokens: int, in_dim: int, out_dim: int) -> nn.Module:
    return INPUT_PROJECTORS.get(config.type)(in_tokens, in_dim, out_dim, config)


def build_output_projector(config: OutputProjectorConfig, in_dim: int) -> nn.Module:
    return OUTPUT_PROJECTORS.get(config.type)(in_dim, config)
