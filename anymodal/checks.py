"""Checks of single config and settings values, shared by every dataclass that validates itself."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


# Upper bounds of the sizes a config may give, far above any released model: a value past them is
# refused before anything is built (a typo, or a hostile file asking for 1e6 layers or 2e9 tokens).
# What passes is then checked against the weights' shapes before allocation where weights exist.
SIZE_LIMITS = {"num_hidden_layers": 1024, "num_layers": 1024, "num_encoder_layers": 1024,
               "num_attention_heads": 4096, "num_heads": 4096, "num_key_value_heads": 4096,
               "hidden_size": 1 << 17, "hidden_dim": 1 << 17, "intermediate_size": 1 << 20, "ffn_dim": 1 << 20,
               "vocab_size": 1 << 22, "image_size": 1 << 14, "patch_size": 1 << 12, "num_channels": 64,
               "max_position_embeddings": 1 << 24, "num_query_tokens": 1 << 14, "num_tokens": 1 << 16,
               "projection_dim": 1 << 17, "encoder_hidden_size": 1 << 17, "cross_attention_frequency": 1024,
               "head_dim": 1 << 14, "word_embed_proj_dim": 1 << 17, "sequence_length": 1 << 16}


def positive_int(name: str, value: Any, *, allow_none: bool = False, limit: int | None = None) -> None:
    """Raise unless ``value`` is an integer > 0 (and <= ``limit``); ``None`` passes with ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value!r}")


def positive_number(name: str, value: Any, *, limit: float | None = None) -> None:
    """Raise unless ``value`` is a finite number > 0 (and <= ``limit``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit:g}, got {value!r}")


def check_keys(where: str, spec: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming the first unknown key of ``spec`` and listing the allowed ones."""
    allowed = set(allowed)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
