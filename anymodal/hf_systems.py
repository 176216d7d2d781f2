"""Released Hugging Face vision-language checkpoints as anymodal systems.

A ``LlavaForConditionalGeneration``, ``Blip2ForConditionalGeneration`` or
``InstructBlipForConditionalGeneration`` folder holds four of anymodal's components in one
file set: a vision tower, an input projector, a language model and a tokenizer. This module

- recognises such a folder by its ``config.json`` ``model_type`` (:func:`hf_system_type`) and
  writes the anymodal config that runs it unchanged (:func:`config_from_hf`);
- reads one component's weights out of the shared checkpoint, strictly: a weight the component
  needs and the checkpoint lacks is an error naming it, one it has and the component does not
  use is reported (:func:`load_strict`);
- loads the language model out of the composite (:func:`load_composite_language_model`);
- holds the prompt layouts of these systems (:data:`PROMPT_FORMATS`).

Why detection and not a converter: the folder stays the one copy of the weights (a 7B
checkpoint is 14 GB), nothing has to be kept in sync, and a YAML config (``configs/llava-1.5-7b.yaml``)
can point its components at the same folder or hub id.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import AnyModalConfig

from .checks import SIZE_LIMITS
from .loading import library_errors

logger = logging.getLogger(__name__)

# config.json model_type of each composite checkpoint anymodal loads unchanged
HF_SYSTEMS = ("llava", "blip-2", "instructblip")

# Where each composite keeps its components. Checkpoints on the hub use the first spelling; a
# composite saved by a recent transformers may use the second.
_VISION_PREFIXES = {"llava": ["vision_tower.", "model.vision_tower."], "blip-2": ["vision_model."],
                    "instructblip": ["vision_model."]}
_LM_KEY_MAPPING = {
    "llava": {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
              r"^model\.language_model\.": "model."},
    "blip-2": {r"^language_model\.": ""},
    "instructblip": {r"^language_model\.": ""},
}
# top-level names in the composites that belong to other components (not reported as unused by the LM)
_NOT_LM = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
           "vision_model.", "qformer.", "query_tokens", "language_projection.")


# ============================================================================ reading checkpoints
def local_dir(source: str | os.PathLike) -> Path:
    """A local directory for ``source``: itself, or the hub snapshot (downloaded when online)."""
    if os.path.isdir(source):
        return Path(source)
    if os.path.exists(source):
        raise ValueError(f"{source!r} is a file; expected a checkpoint directory (or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                                   "*.model", "qformer_tokenizer/*"]))
    except Exception as e:  # offline, unknown id, no permission: all mean "not here"
        raise OSError(f"cannot find checkpoint {str(source)!r}: not a local directory, and the hub says: {e}") from e


def check_config_sizes(cfg: dict[str, Any], path: str | os.PathLike, where: str = "") -> None:
    """Every size field of a config.json (and of its nested configs) is a whole number in its
    bounds (:data:`SIZE_LIMITS`), or null; a ValueError naming the file and the field otherwise."""
    for key, value in cfg.items():
        field = f"{where}{key}"
        if isinstance(value, dict):
            check_config_sizes(value, path, f"{field}.")
        elif key in SIZE_LIMITS and value is not None:
            for v in (value if isinstance(value, list) and key == "image_size" else [value]):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= SIZE_LIMITS[key]:
                    raise ValueError(f"{path}: {field} must be a whole number from 1 to {SIZE_LIMITS[key]}, got "
                                     f"{str(json.dumps(value))[:60]}")


def read_config(source: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory or hub id (only that file is fetched), checked: a
    JSON object whose sizes are whole numbers in bounds (:func:`check_config_sizes`)."""
    from .loading import read_json

    if os.path.isdir(source):
        path = Path(source) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(str(source), "config.json"))
        except Exception as e:
            raise OSError(f"cannot find checkpoint {str(source)!r}: not a local directory, and the hub says: {e}") from e
    cfg = read_json(path, "checkpoint config")
    check_config_sizes(cfg, path)
    return cfg


def model_type_of(source: str | os.PathLike) -> str | None:
    """``model_type`` in a checkpoint's config.json, or None when there is none to read (a config
    that is there but broken is an error naming it)."""
    try:
        return read_config(source).get("model_type")
    except OSError:
        return None


def hf_system_type(path: str | os.PathLike) -> str | None:
    """``model_type`` of a local composite checkpoint anymodal runs unchanged, else None."""
    if not (Path(path) / "config.json").is_file():
        return None
    model_type = read_config(path).get("model_type")
    return model_type if model_type in HF_SYSTEMS else None


def auto_config(source: str | os.PathLike) -> Any:
    """transformers' config object of a checkpoint, from a checked config.json (:func:`read_config`);
    a value transformers cannot take is a ValueError naming the file, not a traceback from inside it."""
    from transformers import AutoConfig

    read_config(source)
    with library_errors(f"{source}: config.json is not a configuration transformers can read"):
        return AutoConfig.from_pretrained(str(source))


def read_weight_index(d: Path, name: str = "model.safetensors.index.json") -> dict[str, Path]:
    """``weight_map`` of a sharded checkpoint: each key's file, a name inside ``d`` (``..`` and
    absolute paths are refused: the index never reads a file elsewhere)."""
    from .loading import confined, read_json

    index = read_json(d / name, "checkpoint index")
    if not isinstance(index.get("metadata"), dict):  # transformers reads it unchecked
        raise ValueError(f"{d / name}: needs a \"metadata\" object (as {{\"total_size\": ...}})")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"{d / name}: weight_map must be an object mapping tensor names to file names")
    files = {f: confined(d, f, f"{d / name}: weight_map", "checkpoint folder", resolve=False) for f in set(wm.values())}
    for f, path in sorted(files.items()):
        # a loader reads whatever the index names, with torch.load (pickle) unless it is safetensors
        if not f.endswith(".safetensors"):
            raise ValueError(f"{d / name}: weight_map names {f[:100]!r}, not a .safetensors file")
        if not path.is_file():
            raise ValueError(f"{d / name}: weight_map names {f[:100]!r}, which is not a file in {d}")
    return {k: files[f] for k, f in wm.items()}


def check_folder(d: str | os.PathLike) -> None:
    """What a loader will read from a local checkpoint folder, checked before it does: its
    JSON files are JSON objects (an error names the file), its weight index stays inside it, and
    pickle weights are refused unless allowed."""
    from .loading import read_json, refuse_pickle

    if not os.path.isdir(d):
        return
    d = Path(d)
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "preprocessor_config.json", "processor_config.json", "tokenizer.json"):
        if (d / name).is_file():
            read_json(d / name, "checkpoint folder")
    if (d / "config.json").is_file():
        read_config(d)
    if (d / "model.safetensors.index.json").is_file():
        read_weight_index(d)
    refuse_pickle(d, "the checkpoint")


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory (safetensors, sharded or not).

    Only the tensors asked for are read. ``pytorch_model.bin`` checkpoints are refused unless pickle is
    allowed (``allow_pickle=True``), and then read with ``torch.load(weights_only=True)``.
    """

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        if str(source).endswith(".safetensors") and os.path.isfile(source):  # one file (an anymodal projector)
            from safetensors import safe_open

            with library_errors(f"{source}: not a readable safetensors file"):
                with safe_open(str(source), "pt") as f:
                    self._where = {k: Path(source) for k in f.keys()}
            return
        d = local_dir(source)
        check_folder(d)  # JSON named when broken, index inside the folder, pickle refused unless allowed
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self._where = read_weight_index(d)
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with library_errors(f"{d / 'model.safetensors'}: not a readable safetensors file"):
                with safe_open(str(d / "model.safetensors"), "pt") as f:
                    self._where = {k: d / "model.safetensors" for k in f.keys()}
        elif (d / "pytorch_model.bin").is_file():
            from .loading import torch_load_weights

            state = torch_load_weights(d / "pytorch_model.bin", "the checkpoint")  # weights only, never code
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise ValueError(f"{d / 'pytorch_model.bin'}: expected a dict of named tensors")
            self._bin = state
            self._where = {k: d / "pytorch_model.bin" for k in self._bin}
        else:
            raise FileNotFoundError(f"{source}: no model.safetensors, model.safetensors.index.json or "
                                    "pytorch_model.bin")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        with self._open(key) as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file's header, without reading the tensor."""
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        with self._open(key) as f:
            return tuple(f.get_slice(key).get_shape())

    def _open(self, key: str):
        from safetensors import SafetensorError, safe_open

        path = self._where[key]
        try:
            return safe_open(str(path), "pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self.source}: cannot read {path.name} for {key!r}: not a complete safetensors "
                             f"file ({str(e)[:200]})") from None


def load_strict(module: nn.Module, source: str | os.PathLike, prefixes: Iterable[str], what: str,
                rename: Callable[[str], Iterable[str]] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Load every weight ``module`` has from ``source``, found under one of ``prefixes``.

    ``rename(key)`` gives the spellings a module key may have in the checkpoint (default: the
    key itself); module keys starting with one of ``skip`` are left as they are, by request.
    Raises ``ValueError`` naming the weights the checkpoint lacks (a component is never left
    partly random) or whose shape differs; logs a warning naming weights under the component's
    prefix that the module does not use.
    """
    reader = CheckpointReader(source)
    rename = rename or (lambda k: [k])
    expected = [k for k in module.state_dict() if not k.startswith(skip)]
    best: tuple[str, dict[str, str]] | None = None
    for prefix in prefixes:
        found = {}
        for k in expected:
            for cand in rename(k):
                if prefix + cand in reader:
                    found[k] = prefix + cand
                    break
        if best is None or len(found) > len(best[1]):
            best = (prefix, found)
    prefix, found = best if best is not None else ("", {})
    missing = [prefix + next(iter(rename(k))) for k in expected if k not in found]  # as the checkpoint names them
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(f"{what}: {source} lacks {len(missing)} of the {len(expected)} weights it needs "
                         f"(looked under {', '.join(repr(p) for p in prefixes) or 'the top level'}): {shown}")
    own = module.state_dict()
    for k, ck in found.items():  # from the files' headers: nothing is read until every shape fits
        shape = reader.shape(ck)
        if shape != tuple(own[k].shape):
            raise ValueError(f"{what}: weight {ck!r} in {source} has shape {shape}, the component needs "
                             f"{tuple(own[k].shape)} for {k!r}; the config does not describe this checkpoint")
    if any(t.is_meta for t in own.values()):  # a shapes-only check, before the real module is built
        return
    module.load_state_dict({k: reader.get(ck) for k, ck in found.items()}, strict=not skip)
    scope = {prefix + c.split(".")[0] for k in expected for c in rename(k)}
    used = set(found.values()) | {prefix + c for k in module.state_dict() if k.startswith(skip) for c in rename(k)}
    unused = sorted(k for k in reader.keys() if k not in used and any(k == s or k.startswith(s + ".") for s in scope))
    if unused:
        logger.warning("%s: %d weight(s) in %s are not used: %s", what, len(unused), source,
                       ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))


def build_checked(factory: Callable[[], nn.Module], source: str | os.PathLike, prefixes: Iterable[str], what: str,
                  rename: Callable[[str], Iterable[str]] | None = None, skip: tuple[str, ...] = ()) -> nn.Module:
    """``factory()`` loaded strictly from ``source``, its sizes checked against the weights first:
    the module is built on the meta device (no memory) and every shape compared with the files'
    headers, so a config that asks for more than the checkpoint holds fails before it allocates."""
    prefixes = list(prefixes)
    with torch.device("meta"), library_errors(f"{what}: the config of {source} does not build a model"):
        meta = factory()
    load_strict(meta, source, prefixes, what, rename=rename, skip=skip)
    del meta
    module = factory()
    load_strict(module, source, prefixes, what, rename=rename, skip=skip)
    return module


def _check_lm_against_weights(source: str | os.PathLike, text_config: Any, kind: str) -> None:
    """The composite's language model, built on the meta device from ``text_config``, against the
    checkpoint's shapes: a weight it needs that is absent or shaped otherwise (``vocab_size``,
    ``num_hidden_layers``...) is an error before the model is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), library_errors(f"language model in {source}: config.json text_config does not "
                                              "build a model"):
        meta = AutoModelForCausalLM.from_config(text_config)
    reader = CheckpointReader(source)
    have = {}
    for ck in reader.keys():
        for pattern, repl in _LM_KEY_MAPPING[kind].items():
            if re.match(pattern, ck):
                have[re.sub(pattern, repl, ck)] = ck
                break
    tied = getattr(text_config, "tie_word_embeddings", False)
    missing = []
    for k, t in meta.state_dict().items():
        ck = have.get(k)
        if ck is None:
            if not (tied and k.startswith("lm_head.")):
                missing.append(k)
        elif reader.shape(ck) != tuple(t.shape):
            raise ValueError(f"language model in {source}: config.json asks for {k!r} of shape {tuple(t.shape)}, "
                             f"but the checkpoint's {ck!r} is {reader.shape(ck)}; the config does not describe "
                             "these weights")
    if missing:
        raise ValueError(f"language model in {source} lacks {len(missing)} weight(s) its config.json asks for "
                         f"(named as in the language model): {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")


# ============================================================================ language model
def load_composite_language_model(source: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The causal LM inside a LLaVA / BLIP-2 / InstructBLIP checkpoint, as its own ``*ForCausalLM``.

    Only the language model's tensors are read (the checkpoint keys are renamed on the way in);
    a missing one is an error naming it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as tlog

    from .utils import quiet_loading, small_local_dir

    kind = read_config(source).get("model_type")
    if kind not in HF_SYSTEMS:
        raise ValueError(f"{source}: model_type {kind!r} is not a composite anymodal can take a language model "
                         f"from; expected one of {', '.join(HF_SYSTEMS)}")
    config = auto_config(source)
    if not getattr(config, "use_decoder_only_language_model", True):
        raise ValueError(f"{source}: its language model ({config.text_config.model_type}) is an encoder-decoder; "
                         "anymodal's LLM is a decoder-only causal LM")
    check_folder(source)  # JSON, weight index and pickle, before transformers reads any of them
    _check_lm_against_weights(source, config.text_config, kind)
    verbosity = tlog.get_verbosity()
    tlog.set_verbosity_error()  # the other components' weights are 'unexpected' to the LM by design
    try:
        with quiet_loading(show_bars=not small_local_dir(source)):
            lm, info = AutoModelForCausalLM.from_pretrained(str(source), config=config.text_config, dtype=dtype,
                                                            key_mapping=_LM_KEY_MAPPING[kind],
                                                            output_loading_info=True)
    finally:
        tlog.set_verbosity(verbosity)
    # transformers records key_mapping and would rename the keys back on save_pretrained; the extracted
    # model is a plain causal LM and saves as one (as if built from scratch)
    lm._weight_conversions = None
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
        raise ValueError(f"language model in {source} lacks {len(bad)} weight(s) it needs, or has them in another "
                         f"shape (named as in the language model, without the checkpoint's prefix): {', '.join(bad[:8])}")
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(_NOT_LM))
    if unused:
        logger.warning("language model in %s: %d weight(s) not used: %s", source, len(unused), ", ".join(unused[:8]))
    return lm


# ============================================================================ prompt layouts
@dataclass(frozen=True)
class PromptFormat:
    """How a released system lays out its prompt, reproduced token for token.

    ``template`` is a chat template (set on the tokenizer, so it is saved with it).
    ``add_special_tokens``: the tokenizer adds its BOS, as the system's own processor does (a
    BOS written into the text would tokenize differently with SentencePiece tokenizers).
    ``media_before_bos``: BLIP-2 and InstructBLIP put the query positions before the BOS.
    """

    template: str
    add_special_tokens: bool = True
    media_before_bos: bool = False


# LLaVA-1.5 (Vicuna v1 without the system line): "USER: <image>\nQ ASSISTANT: A</s>USER: ..."
_LLAVA_15 = ("{%- for m in messages -%}"
             "{%- if m['role'] == 'system' -%}{{ m['content'] + ' ' }}"
             "{%- elif m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + ' ' }}"
             "{%- else -%}{{ 'ASSISTANT: ' + m['content'] + eos_token }}"
             "{%- endif -%}{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
# BLIP-2 / InstructBLIP take the prompt as written ("Question: ... Answer:"); turns are joined by a space
_PLAIN = "{%- for m in messages -%}{{ m['content'] }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}{%- endfor -%}"

PROMPT_FORMATS: dict[str, PromptFormat] = {
    "llava-1.5": PromptFormat(_LLAVA_15),
    "blip-2": PromptFormat(_PLAIN, media_before_bos=True),
    "instructblip": PromptFormat(_PLAIN, media_before_bos=True),
}


def prompt_format(name: str) -> PromptFormat:
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown llm.prompt_format {name!r}; known: {', '.join(sorted(PROMPT_FORMATS))}") from None


# ============================================================================ configs
_SYSTEM_PROMPT_FORMAT = {"llava": "llava-1.5", "blip-2": "blip-2", "instructblip": "instructblip"}
_CHECKPOINT_DTYPES = {"float32", "float16", "bfloat16"}


def config_from_hf(path: str | os.PathLike) -> "AnyModalConfig":
    """The anymodal config that runs a LLaVA / BLIP-2 / InstructBLIP checkpoint folder as it is.

    Every component points at ``path``; geometry comes from its ``config.json``. Text is the only
    output (these are understanding systems: no generators).
    """
    from transformers import AutoConfig

    from .config import AnyModalConfig

    path = str(path)
    kind = hf_system_type(path) if os.path.isdir(path) else read_config(path).get("model_type")
    if kind not in HF_SYSTEMS:
        raise ValueError(f"{path}: not a checkpoint anymodal runs unchanged (model_type must be one of "
                         f"{', '.join(HF_SYSTEMS)})")
    hf = auto_config(path)
    dtype = str(getattr(hf, "dtype", None) or getattr(hf.text_config, "dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    llm = {"model": path, "prompt_format": _SYSTEM_PROMPT_FORMAT[kind],
           "dtype": dtype if dtype in _CHECKPOINT_DTYPES else "float32"}
    if kind == "llava":
        vc = hf.vision_config
        layer, strategy = hf.vision_feature_layer, hf.vision_feature_select_strategy
        if vc.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"{path}: LLaVA with a {vc.model_type} vision tower is not supported "
                             "(supported: clip_vision_model, siglip_vision_model)")
        if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
            raise ValueError(f"{path}: the projector must be Linear-GELU-Linear with biases (anymodal's 'mlp'); "
                             f"got act={hf.projector_hidden_act!r}, bias={hf.multimodal_projector_bias!r}")
        keep_cls = strategy == "full"
        has_cls = vc.model_type == "clip_vision_model"
        tokens = (vc.image_size // vc.patch_size) ** 2 + (1 if has_cls and keep_cls else 0)
        encoder = {"type": "hf-vision", "modalities": ["image"], "pretrained": path,
                   "options": {"feature_layer": layer, "keep_cls": keep_cls or not has_cls}}
        projector = {"type": "mlp", "num_tokens": tokens, "hidden_dim": hf.text_config.hidden_size,
                     "num_layers": 2, "pretrained": path}
    else:
        encoder = {"type": "hf-vision", "modalities": ["image"], "pretrained": path, "options": {}}
        projector = {"type": "qformer", "num_tokens": hf.num_query_tokens, "pretrained": path,
                     "options": {"instruction": True} if kind == "instructblip" else {}}
    name = Path(path).name or kind
    try:
        return AnyModalConfig.from_dict({"name": name, "llm": llm, "encoders": {"vision": encoder},
                                         "input_projectors": {"image": projector}})
    except ValueError as e:  # a size derived from config.json (image tokens from image_size) out of bounds
        raise ValueError(f"{path}: config.json gives {e}") from None


# ============================================================================ projectors
def qformer_geometry(source: str | os.PathLike) -> tuple[dict[str, Any], int, str]:
    """``(qformer_config kwargs, num_query_tokens, model_type)`` of a BLIP-2 / InstructBLIP checkpoint."""
    from transformers import AutoConfig

    kind = read_config(source).get("model_type")
    if kind not in ("blip-2", "instructblip"):
        raise ValueError(f"qformer projector: pretrained {str(source)!r} is a {kind!r} checkpoint; a Q-Former "
                         "comes from a blip-2 or instructblip checkpoint (or set options.config)")
    hf = auto_config(source)
    q = hf.qformer_config.to_dict()
    keep = {k: v for k, v in q.items() if k in _QFORMER_FIELDS}
    return keep, hf.num_query_tokens, kind


_QFORMER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                   "initializer_range", "layer_norm_eps", "pad_token_id", "cross_attention_frequency",
                   "encoder_hidden_size", "use_qformer_text_input")

# anymodal projector key -> composite checkpoint key
_PROJECTOR_KEYS: dict[tuple[str, str], Callable[[str], list[str]]] = {
    ("mlp", "llava"): lambda k: [re.sub(r"^net\.0\.", "multi_modal_projector.linear_1.",
                                        re.sub(r"^net\.2\.", "multi_modal_projector.linear_2.", k))],
    ("qformer", "blip-2"): lambda k: [re.sub(r"^proj\.", "language_projection.", k)],
    ("qformer", "instructblip"): lambda k: [re.sub(r"^proj\.", "language_projection.", k)],
}


def load_projector_weights(module: nn.Module, projector_type: str, pretrained: str, where: str) -> None:
    """Load an input projector's weights strictly: from an anymodal ``.safetensors`` file, or from the
    matching part of a LLaVA (``mlp``) / BLIP-2 or InstructBLIP (``qformer``) checkpoint."""
    if str(pretrained).endswith(".safetensors"):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"{where}.pretrained: no such file {pretrained!r}")
        load_strict(module, pretrained, [""], where, skip=getattr(module, "fresh_keys", ()))
        return
    kind = read_config(pretrained).get("model_type")
    rename = _PROJECTOR_KEYS.get((projector_type, kind))
    if rename is None:
        known = ", ".join(f"{t} from {k}" for t, k in _PROJECTOR_KEYS)
        raise ValueError(f"{where}.pretrained: a {projector_type!r} projector cannot be taken from a {kind!r} "
                         f"checkpoint ({pretrained}); known: {known}, or an anymodal .safetensors file")
    prefixes = ["", "model."] if kind == "llava" else [""]
    load_strict(module, pretrained, prefixes, where, rename=rename, skip=getattr(module, "fresh_keys", ()))


def load_instruction_tokenizer(config: "AnyModalConfig") -> Any | None:
    """The Q-Former's own tokenizer, for an instruction-aware (InstructBLIP) projector, else None.

    From ``options.tokenizer`` (a directory, or ``bytes``), else the checkpoint's ``qformer_tokenizer``.
    """
    from transformers import AutoTokenizer

    from .tokenization import byte_level_tokenizer

    for m, p in config.input_projectors.items():
        if p.type != "qformer" or not p.options.get("instruction"):
            continue
        name = p.options.get("tokenizer")
        if name == "bytes":
            return byte_level_tokenizer()
        if name is None:
            if p.pretrained is None:
                raise ValueError(f"input_projectors.{m.value}: an instruction-aware Q-Former needs its tokenizer: "
                                 "set options.tokenizer (a directory, or 'bytes') or pretrained")
            name = str(local_dir(p.pretrained) / "qformer_tokenizer")
            if not os.path.isdir(name):  # else transformers says "Repo id must be in the form..."
                raise FileNotFoundError(
                    f"input_projectors.{m.value}: the instruction-aware Q-Former's tokenizer is missing: "
                    f"{name} does not exist (InstructBLIP folders ship it beside the weights); restore it, or set "
                    "options.tokenizer to a tokenizer directory")
        return AutoTokenizer.from_pretrained(name)
    return None
