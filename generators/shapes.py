"""Reading a generator's conditioning shapes from its pipeline's component configs.

A generator declares which components fix its conditioning (``shape_components``) and how to read
the shapes from their configs (``shapes_from``). The configs come from the built pipeline or, for
a ``lazy`` generator, from the saved files alone (:func:`read_component_configs`), so the shapes
are known before any weights load. The readers here are what the built-in generators share.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def _frozen(config: Mapping[str, Any]) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def read_component_configs(pipeline_class: type, pretrained: str, names: Iterable[str]) -> dict[str, Any]:
    """Configs (and tokenizers) of a saved pipeline's components, without loading any weights.

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


def component_config(component: Any) -> Any:
    """What :meth:`shapes_from` reads of a built component: a model's config, a tokenizer as it is."""
    if component is None or not hasattr(component, "config"):
        return component
    return component.config


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
