"""Convert NExT-GPT's released delta checkpoint to an anymodal pipeline directory.

NExT-GPT (NExT-GPT/NExT-GPT, ``NExT-GPT-Lagacy/code`` at 60d618b) saves one ``pytorch_model.pt``:
a plain dict of the tensors it trained on top of Vicuna-7B v0. This module maps its keys to
anymodal's components with a renaming table and two reshapes (``query_embs`` loses its batch
axis; the embedding matrices gain rows for anymodal's input placeholders):

=============================================================  ==========================================
NExT-GPT key                                                   anymodal
=============================================================  ==========================================
``llama_model.base_model.model.model.layers.N.self_attn.       ``llm_adapter/`` (peft LoRA, r and alpha
X_proj.lora_{A,B}[.default].weight``                           as trained)
``llama_model[.base_model.model].model.embed_tokens.weight``   ``llm/token_rows.safetensors`` (every row)
``llama_model[.base_model.model].lm_head.weight``              ``llm/token_rows.safetensors`` (every row)
``llama_proj.{weight,bias}``                                   ``input_projectors/*`` (one, shared)
``gen_text_hidden_fcs{,_video,_audio}.0.fc.*``                 ``output_projectors/M``: ``in_proj.*``
``...query_embs`` (1, Q, d)                                    ``queries.prompt_embeds`` (Q, d)
``...tfm.encoder.*`` / ``...tfm.decoder.*``                    ``encoders.prompt_embeds.*`` / ``decoders...``
``...model.{weight,bias}``                                     ``out_proj.prompt_embeds.*``
=============================================================  ==========================================

The Vicuna base is referenced by absolute path, not copied, so the converter never holds two
copies of a 7B model: it reads the delta memory-mapped and writes one group of tensors at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..modality import Modality

HELP = "NExT-GPT's delta checkpoint (pytorch_model.pt, nextgpt_7b_tiva_v0) on top of Vicuna-7B v0"

# NExT-GPT adds its tokens in this order right after the base vocabulary (anyToImageVideoAudio.py:
# _add_image_token, _add_video_token, _add_audio_token): <Img>, </Img>, [IMG0..3], [VID0..23], [AUD0..7].
WRAP = ("<Img>", "</Img>")
SIGNALS: tuple[tuple[Modality, str, int], ...] = (
    (Modality.IMAGE, "[IMG{i}]", 4), (Modality.VIDEO, "[VID{i}]", 24), (Modality.AUDIO, "[AUD{i}]", 8))
ADDED_TOKENS = len(WRAP) + sum(n for _, _, n in SIGNALS)

OUTPUT_PREFIXES = {Modality.IMAGE: "gen_text_hidden_fcs.0.", Modality.VIDEO: "gen_text_hidden_fcs_video.0.",
                   Modality.AUDIO: "gen_text_hidden_fcs_audio.0."}
# TextFcLayer (mode "transformer") -> TransformerOutputProjector, target "prompt_embeds"
OUTPUT_KEYS = [
    (re.compile(r"fc\.(weight|bias)"), r"in_proj.\1"),
    (re.compile(r"query_embs"), "queries.prompt_embeds"),
    (re.compile(r"tfm\.encoder\.(.+)"), r"encoders.prompt_embeds.\1"),
    (re.compile(r"tfm\.decoder\.(.+)"), r"decoders.prompt_embeds.\1"),
    (re.compile(r"model\.(weight|bias)"), r"out_proj.prompt_embeds.\1"),
]
LORA_KEY = re.compile(r"llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)"
                      r"\.lora_([AB])(?:\.default)?\.weight")
EMBED_KEYS = ("llama_model.model.embed_tokens.weight", "llama_model.base_model.model.model.embed_tokens.weight")
LM_HEAD_KEYS = ("llama_model.lm_head.weight", "llama_model.base_model.model.lm_head.weight")
INPUT_KEYS = {"llama_proj.weight": "proj.weight", "llama_proj.bias": "proj.bias"}

DEFAULT_GENERATORS = {Modality.IMAGE: "stable-diffusion-v1-5/stable-diffusion-v1-5",
                      Modality.AUDIO: "cvssp/audioldm-l-full", Modality.VIDEO: "cerspense/zeroscope_v2_576w"}
NHEAD = 4  # TextFcLayer's nn.Transformer(nhead=4): the one size the tensors cannot tell


class ConversionError(ValueError):
    """The file is not a NExT-GPT delta checkpoint that fits the given base model."""


@dataclass
class DeltaPlan:
    """The keys of a NExT-GPT delta, sorted into anymodal components, with the sizes they imply."""

    lora: dict[str, str] = field(default_factory=dict)  # NExT-GPT key -> peft adapter key
    embed: str = ""
    lm_head: str = ""
    input: dict[str, str] = field(default_factory=dict)
    output: dict[Modality, dict[str, str]] = field(default_factory=dict)
    rows: int = 0
    hidden: int = 0


def load_delta(path: str | Path) -> dict[str, torch.Tensor]:
    """The delta's tensors, memory-mapped when the file allows, read without running pickle code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NExT-GPT checkpoint not found: {path}")
    from ..loading import torch_load_weights

    try:
        state = torch_load_weights(path, "NExT-GPT delta")  # memory-mapped, tensors only, one-line errors
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: expected a dict of tensors (NExT-GPT's pytorch_model.pt), "
                              f"got {type(state).__name__}{' (empty)' if isinstance(state, dict) else ''}")
    for k, v in state.items():
        if not isinstance(k, str):
            raise ConversionError(f"{path}: key {k!r} is a {type(k).__name__}, not a string; NExT-GPT's keys are "
                                  "parameter names")
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return state


def plan_delta(state: dict[str, torch.Tensor], source: str = "checkpoint") -> DeltaPlan:
    """Sort every key into a component and check the shapes agree; raise naming any key that does not fit."""
    plan = DeltaPlan()
    unknown = []
    for key in state:
        if (m := LORA_KEY.fullmatch(key)) is not None:
            layer, proj, ab = m.groups()
            plan.lora[key] = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"
        elif key in EMBED_KEYS:
            plan.embed = key
        elif key in LM_HEAD_KEYS:
            plan.lm_head = key
        elif key in INPUT_KEYS:
            plan.input[key] = INPUT_KEYS[key]
        elif (mod := next((m for m, p in OUTPUT_PREFIXES.items() if key.startswith(p)), None)) is not None:
            rest = key[len(OUTPUT_PREFIXES[mod]):]
            for pattern, target in OUTPUT_KEYS:
                if pattern.fullmatch(rest):
                    plan.output.setdefault(mod, {})[key] = pattern.sub(target, rest)
                    break
            else:
                raise ConversionError(f"{source}: {key!r} is not part of NExT-GPT's 'transformer' output projector "
                                      "(fc, query_embs, tfm.encoder, tfm.decoder, model); only that mode, the "
                                      "released one, converts")
        else:
            unknown.append(key)
    recognised = len(state) - len(unknown)
    if recognised == 0:
        raise ConversionError(f"{source} does not look like a NExT-GPT delta checkpoint: none of its {len(state)} "
                              f"keys (e.g. {unknown[0]!r}) is one of NExT-GPT's (llama_proj.*, "
                              "gen_text_hidden_fcs*.0.*, llama_model.*)")
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} key(s) are not NExT-GPT delta keys anymodal knows, e.g. "
                              f"{unknown[0]!r}; nothing was converted")
    missing = [name for name, ok in (("embed_tokens (llama_model...embed_tokens.weight)", plan.embed),
                                     ("lm_head (llama_model...lm_head.weight)", plan.lm_head),
                                     ("llama_proj.weight", "llama_proj.weight" in plan.input),
                                     ("llama_proj.bias", "llama_proj.bias" in plan.input)) if not ok]
    missing += [f"{p}* ({m.value} output projector)" for m, p in OUTPUT_PREFIXES.items() if m not in plan.output]
    if missing:
        raise ConversionError(f"{source}: NExT-GPT tensors missing: {', '.join(missing)} (a truncated or partial "
                              "checkpoint?)")
    embed, head = state[plan.embed], state[plan.lm_head]
    if embed.ndim != 2 or head.shape != embed.shape:
        raise ConversionError(f"{source}: {plan.embed} {tuple(embed.shape)} and {plan.lm_head} {tuple(head.shape)} "
                              "must both be [vocabulary, hidden]")
    plan.rows, plan.hidden = embed.shape
    w, b = state["llama_proj.weight"], state["llama_proj.bias"]
    if w.ndim != 2 or w.shape[0] != plan.hidden or tuple(b.shape) != (plan.hidden,):
        raise ConversionError(f"{source}: llama_proj.weight {tuple(w.shape)} / bias {tuple(b.shape)} do not map "
                              f"into the LLM's hidden size {plan.hidden}")
    for key in plan.lora:
        t = state[key]
        if t.ndim != 2 or (key.endswith(("lora_A.weight", "lora_A.default.weight")) and t.shape[1] != plan.hidden):
            raise ConversionError(f"{source}: {key} has shape {tuple(t.shape)}; LoRA A must be [r, {plan.hidden}]")
    for m, keys in plan.output.items():
        fc = state[OUTPUT_PREFIXES[m] + "fc.weight"] if OUTPUT_PREFIXES[m] + "fc.weight" in state else None
        if fc is None or fc.ndim != 2 or fc.shape[1] != plan.hidden:
            raise ConversionError(f"{source}: {OUTPUT_PREFIXES[m]}fc.weight must be [d_model, {plan.hidden}], got "
                                  f"{None if fc is None else tuple(fc.shape)}")
    return plan


def output_projector_config(state: dict[str, torch.Tensor], prefix: str, num_heads: int = NHEAD) -> dict[str, Any]:
    """An ``OutputProjectorConfig`` dict with every size read from the tensors (heads excepted)."""
    def layers(stack: str) -> int:
        # the count comes from the keys present, never from the largest index: one key naming layer
        # 3000000 must not make a 3000001-layer module
        idx = sorted({int(m.group(1)) for k in state
                      if (m := re.match(re.escape(prefix + f"tfm.{stack}.layers.") + r"(\d+)\.", k))})
        if idx != list(range(len(idx))):
            shown = ", ".join(map(str, idx[:4])) + (f", ..., {idx[-1]}" if len(idx) > 4 else "")
            raise ConversionError(f"{prefix}tfm.{stack}: layer indices {shown} are not 0..{len(idx) - 1}, one per "
                                  "layer; the checkpoint is damaged or not NExT-GPT's")
        return len(idx)

    try:
        d_model = state[prefix + "fc.weight"].shape[0]
        queries = state[prefix + "query_embs"]
        out = state[prefix + "model.weight"]
        ffn = state[prefix + "tfm.decoder.layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise ConversionError(f"NExT-GPT output projector {prefix}*: tensor {e.args[0]!r} is missing") from None
    for name, t in (("fc.weight", state[prefix + "fc.weight"]), ("model.weight", out),
                    ("tfm.decoder.layers.0.linear1.weight", state[prefix + "tfm.decoder.layers.0.linear1.weight"])):
        if t.ndim != 2:
            raise ConversionError(f"{prefix}{name} must be a matrix [out, in], got shape {tuple(t.shape)}")
    if queries.ndim != 3 or queries.shape[0] != 1 or queries.shape[2] != d_model:
        raise ConversionError(f"{prefix}query_embs must be [1, queries, {d_model}], got {tuple(queries.shape)}")
    if d_model % num_heads:
        raise ConversionError(f"{prefix}: d_model {d_model} is not divisible by {num_heads} heads")
    return {"type": "transformer", "targets": {"prompt_embeds": [int(queries.shape[1]), int(out.shape[0])]},
            "hidden_dim": int(d_model), "num_layers": layers("decoder"), "num_encoder_layers": layers("encoder"),
            "num_heads": num_heads, "ffn_dim": int(ffn), "dropout": 0.0, "add_token_embeddings": True}


def _read_llm_config(llm: Path) -> dict[str, Any]:
    path = llm / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--llm {llm}: no config.json; give the directory of Vicuna-7B v0 in Hugging Face "
                                "format (LLaMA-7B with lmsys/vicuna-7b-delta-v0 applied)")
    from ..loading import read_json

    return read_json(path, f"--llm {llm}")


def _check_base(plan: DeltaPlan, state: dict[str, torch.Tensor], llm_cfg: dict[str, Any], llm: Path,
                base_vocab: int) -> None:
    hidden = llm_cfg.get("hidden_size")
    if hidden != plan.hidden:
        raise ConversionError(f"the checkpoint was trained on an LLM of hidden size {plan.hidden}, but --llm {llm} "
                              f"has hidden_size {hidden}")
    if plan.rows != base_vocab + ADDED_TOKENS:
        raise ConversionError(f"different base vocabulary: the checkpoint's embeddings have {plan.rows} rows, which "
                              f"is {plan.rows - ADDED_TOKENS} base tokens + NExT-GPT's {ADDED_TOKENS}, but the "
                              f"tokenizer in --llm {llm} has {base_vocab} tokens (Vicuna v0: 32000)")
    if llm_cfg.get("vocab_size") not in (None, base_vocab):
        raise ConversionError(f"--llm {llm}: config vocab_size {llm_cfg.get('vocab_size')} differs from its "
                              f"tokenizer's {base_vocab} tokens")
    if llm_cfg.get("tie_word_embeddings"):
        raise ConversionError(f"--llm {llm} ties its input and output embeddings; NExT-GPT's base (Vicuna) does not")
    n_layers = llm_cfg.get("num_hidden_layers", 0)
    top = max((int(LORA_KEY.fullmatch(k).group(1)) for k in plan.lora), default=-1)
    if top >= n_layers:
        raise ConversionError(f"the checkpoint has LoRA weights for layer {top}, but --llm {llm} has {n_layers} layers")


def _tokenizer(llm: Path, plan: DeltaPlan, state, llm_cfg) -> Any:
    """Vicuna's tokenizer as NExT-GPT used it, with NExT-GPT's tokens added as NExT-GPT adds them.

    NExT-GPT loads ``LlamaTokenizer`` (the slow SentencePiece tokenizer) and calls ``add_tokens``:
    the added tokens are ordinary, not special, so ``skip_special_tokens`` decoding keeps them.
    A folder with ``tokenizer.model`` gets that slow tokenizer (the fast conversion drops a leading
    space); a folder with only ``tokenizer.json`` gets its fast tokenizer.
    """
    from ..tokenization import load_tokenizer_from, tokenizer_files

    backend = "sentencepiece" if "tokenizer.model" in tokenizer_files(llm) else "auto"
    tok = load_tokenizer_from(llm, backend, what="--llm")
    base_vocab = len(tok)
    _check_base(plan, state, llm_cfg, llm, base_vocab)
    names = list(WRAP) + [name.format(i=i) for _, name, n in SIGNALS for i in range(n)]
    vocab = tok.get_vocab()  # once: a slow tokenizer builds it token by token
    present = [t for t in names if t in vocab]
    if present:
        raise ConversionError(f"the tokenizer in --llm {llm} already has {present[0]!r}; give the plain Vicuna v0 "
                              "tokenizer (NExT-GPT adds its tokens after the 32000 base tokens)")
    tok.add_tokens(names)
    ids = tok.convert_tokens_to_ids(names)
    if ids != list(range(base_vocab, base_vocab + len(names))):
        raise ConversionError(f"the tokenizer gave NExT-GPT's tokens ids {ids[:3]}..., not {base_vocab}.. in order")
    return tok, backend


def _check_imagebind(path: Path, preset: str, width: int) -> None:
    """The ImageBind file fits the preset (shapes only, nothing loaded) and its joint space is as wide
    as llama_proj's input: a wrong --imagebind is refused now, not when the pipeline loads."""
    from ..encoders.imagebind import ImageBindEncoder, ImageBindOptions

    try:
        opts = ImageBindOptions.from_dict({"preset": preset, "audio_logit_scale": False})
    except ValueError as e:
        raise ConversionError(f"--imagebind-preset: {e}") from None
    if opts.out_embed_dim != width:
        raise ConversionError(f"--imagebind-preset {preset} gives {opts.out_embed_dim}-d embeddings, but the "
                              f"checkpoint's llama_proj takes {width}-d ImageBind features (NExT-GPT: huge, 1024)")
    try:
        ImageBindEncoder.check_checkpoint(opts, ["image", "audio", "video"], path)
    except ValueError as e:
        raise ConversionError(f"--imagebind {path}: {str(e).splitlines()[0]}") from None


def build_config(plan: DeltaPlan, state, llm: Path, imagebind: Path | None, imagebind_preset: str,
                 generators: dict[Modality, str], dtype: str, num_heads: int, lora_alpha: int) -> dict[str, Any]:
    """The shipped ``nextgpt-7b`` config with paths filled in and every size read from the checkpoint."""
    from ..pipeline import shipped_config

    cfg = yaml.safe_load(shipped_config("nextgpt-7b").read_text())
    cfg["llm"]["model"] = str(llm)
    cfg["llm"]["dtype"] = dtype
    r = {state[k].shape[0] for k in plan.lora if ".lora_A" in k}
    if len(r) > 1:
        raise ConversionError(f"LoRA ranks differ between layers: {sorted(r)}")
    if r:
        targets = sorted({LORA_KEY.fullmatch(k).group(2) for k in plan.lora})
        cfg["llm"]["lora"] = {"r": r.pop(), "alpha": lora_alpha, "dropout": 0.1, "target_modules": targets}
    else:
        cfg["llm"]["lora"] = None
    if imagebind is None:  # text in, text and media out
        cfg["encoders"], cfg["input_projectors"] = {}, {}
    else:
        cfg["encoders"]["imagebind"]["pretrained"] = str(imagebind)
        cfg["encoders"]["imagebind"]["options"] = {"preset": imagebind_preset, "audio_logit_scale": False}
    for m, prefix in OUTPUT_PREFIXES.items():
        cfg["output_projectors"][m.value] = output_projector_config(state, prefix, num_heads)
        cfg["generators"][m.value]["pretrained"] = generators[m]
    return cfg


def convert_nextgpt(delta: str | Path, llm: str | Path, out: str | Path, imagebind: str | Path | None = None,
                    imagebind_preset: str = "huge", generators: dict[Modality | str, str] | None = None,
                    dtype: str = "float16", num_heads: int = NHEAD, lora_alpha: int = 32,
                    progress: bool = True, log=print, overwrite: bool = False) -> Path:
    """Write an anymodal pipeline directory for NExT-GPT's delta checkpoint on top of ``llm`` (Vicuna v0).

    ``imagebind`` is ``imagebind_huge.pth`` (without it the pipeline takes text input only);
    ``generators`` overrides the image/audio/video generator ids or directories (defaults: NExT-GPT's).
    The directory loads with ``AnyModalPipeline.from_pretrained(out)``; Vicuna, ImageBind and the
    generators are referenced by path or id, not copied. An existing ``out`` that anymodal did not
    write is refused unless ``overwrite``; one that is or holds an input (``llm``...) always is.
    """
    from tqdm.auto import tqdm

    from ..config import AnyModalConfig
    from ..pipeline import FORMAT_VERSION, INDEX_NAME, SAVED_NAMES, _make_processor
    from ..utils import atomic_dir, atomic_write_text, check_replaceable

    delta, llm, out = Path(delta), Path(llm).resolve(), Path(out)
    imagebind = None if imagebind is None else Path(imagebind).resolve()
    if imagebind is not None and not imagebind.is_file():
        raise FileNotFoundError(f"--imagebind {imagebind}: no such file (imagebind_huge.pth)")
    gens = check_options(imagebind_preset, generators, num_heads)
    check_replaceable(out, marker=INDEX_NAME, known=SAVED_NAMES, what="--out", overwrite=overwrite,
                      flag="--overwrite (overwrite=True)", keep=[delta, llm, imagebind, *gens.values()])

    state = load_delta(delta)
    plan = plan_delta(state, str(delta))
    llm_cfg = _read_llm_config(llm)
    if imagebind is not None:
        _check_imagebind(imagebind, imagebind_preset, state["llama_proj.weight"].shape[1])
    tok, backend = _tokenizer(llm, plan, state, llm_cfg)
    raw_cfg = build_config(plan, state, llm, imagebind, imagebind_preset, gens, dtype, num_heads, lora_alpha)
    raw_cfg["llm"]["tokenizer_backend"] = backend
    cfg = AnyModalConfig.from_dict(raw_cfg)
    processor = _make_processor(cfg, tok)
    # anymodal's own placeholders (<image>, <audio>, <video>) come after NExT-GPT's tokens; their rows
    # are never read (features replace them) and never generated (generation suppresses them)
    total = len(processor.tokenizer)
    base_vocab = plan.rows - ADDED_TOKENS
    want = {m: list(range(base_vocab + 2 + sum(n for _, _, n in SIGNALS[:k]), base_vocab + 2 + sum(
        n for _, _, n in SIGNALS[:k + 1]))) for k, (m, _, _) in enumerate(SIGNALS)}
    if processor.signal_ids != want or total != plan.rows + len(processor.placeholder_ids):
        raise ConversionError(f"signal-token ids {processor.signal_ids} do not follow NExT-GPT's layout {want}")

    # in bytes: the embedding rows (most of the file) advance the bar block by block as they are written
    extra = (total - plan.rows) * plan.hidden * state[plan.embed].element_size() * 2 + 8 * total  # zeros, ids
    bar = tqdm(total=sum(_nbytes(t) for t in state.values()) + extra, unit="B", unit_scale=True,
               unit_divisor=1024, desc="converting", disable=not progress)

    def write(tmp: Path) -> None:
        # Vicuna, ImageBind and the generators stay where they are: external entries (absolute path or hub id)
        components: dict[str, Any] = {
            "encoders": {}, "input_projectors": {}, "output_projectors": {},
            "generators": {m.value: {"kind": "external", "source": g.pretrained} for m, g in cfg.generators.items()},
            "adapter": None, "llm": {"kind": "token_rows", "path": "llm", "base": str(llm)}}
        processor.save_pretrained(tmp / "processor")
        _write_token_rows(tmp, state, plan, total, bar, log)
        if plan.lora:
            components["adapter"] = _write_lora(tmp, state, plan, cfg, llm, bar, log)
        _write_input_projector(tmp, state, plan, cfg, imagebind, components, bar, log)
        _write_output_projectors(tmp, state, plan, cfg, delta, components, bar, log)
        index = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "components": components}
        atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=2))
        cfg.to_yaml(tmp / "config.yaml")

    try:
        atomic_dir(out, write)
    finally:
        bar.close()
    log(f"converted {len(state)} tensors from {delta} into {out} (Vicuna referenced at {llm})")
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_options(imagebind_preset: str, generators: dict[Modality | str, str | None] | None,
                  num_heads: Any) -> dict[Modality, str]:
    """Check the options that the checkpoint cannot tell, before anything is read; returns the
    generator of each modality (a local directory made absolute, or a hub id)."""
    from ..encoders.imagebind import list_presets
    from ..loading import check_external

    if imagebind_preset not in list_presets():
        raise ConversionError(f"--imagebind-preset {imagebind_preset!r} is not an ImageBind preset; available: "
                              f"{', '.join(list_presets())}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 1 <= num_heads <= 1024:
        raise ConversionError(f"--output-heads must be a whole number from 1 to 1024, got {num_heads!r}")
    gens = dict(DEFAULT_GENERATORS)
    for k, v in (generators or {}).items():
        if v is None:
            continue
        m, where = Modality.parse(k), f"--{Modality.parse(k).value}-generator"
        if os.path.exists(v):
            if not os.path.isdir(v):
                raise ConversionError(f"{where} {v}: a file; give a diffusers pipeline directory or a hub id")
            if not os.path.isfile(os.path.join(v, "model_index.json")):
                raise ConversionError(f"{where} {v}: not a diffusers pipeline directory (no model_index.json)")
            gens[m] = str(Path(v).resolve())
        else:
            try:
                if os.path.isabs(v):
                    raise ValueError(v)
                gens[m] = check_external(str(v), where)
            except ValueError:
                raise ConversionError(f"{where} {v!r}: no such directory, and not a hub id (owner/name)") from None
    return gens


def _write_token_rows(tmp: Path, state: dict[str, torch.Tensor], plan: Any, total: int, bar: Any, log) -> None:
    """Every row of the delta's embed_tokens and lm_head, plus zero rows for anymodal's placeholders,
    streamed from the mapped delta in row blocks (never a whole [vocabulary, hidden] copy)."""
    from ..lowmem import release_tensors, row_blocks, write_safetensors

    (tmp / "llm").mkdir()
    extra = total - plan.rows
    ids = torch.arange(total, dtype=torch.long)
    entries = [("token_ids", torch.long, (total,), lambda: iter([ids]))]
    for name, key in (("input_rows", plan.embed), ("output_rows", plan.lm_head)):
        t = state[key]
        entries.append((name, t.dtype, (total, t.shape[1]), row_blocks(t, extra)))
    write_safetensors(tmp / "llm" / "token_rows.safetensors", entries, metadata={"format": "pt"},
                      on_block=bar.update)
    release_tensors([state[plan.embed], state[plan.lm_head]])  # written: their mapped pages can go
    log(f"embeddings: embed_tokens and lm_head [{plan.rows}, {plan.hidden}] ({plan.rows - ADDED_TOKENS} base + "
        f"{ADDED_TOKENS} NExT-GPT tokens), all rows kept; {extra} placeholder rows added")


def _write_lora(tmp: Path, state: dict[str, torch.Tensor], plan: Any, cfg: Any, llm: Path, bar: Any, log) -> str:
    """The LoRA adapter in peft's format; returns its directory name."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    lc = cfg.llm.lora
    LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
               task_type="CAUSAL_LM", base_model_name_or_path=str(llm)).save_pretrained(str(tmp / "llm_adapter"))
    save_file({dst: state[src].contiguous() for src, dst in plan.lora.items()},
              str(tmp / "llm_adapter" / "adapter_model.safetensors"))
    bar.update(sum(_nbytes(state[k]) for k in plan.lora))
    n_layers = len({LORA_KEY.fullmatch(k).group(1) for k in plan.lora})
    log(f"LoRA: {len(plan.lora)} tensors, {n_layers} layers x {'/'.join(lc.target_modules)}, r={lc.r}, "
        f"alpha={lc.alpha}")
    return "llm_adapter"


def _write_input_projector(tmp: Path, state: dict[str, torch.Tensor], plan: Any, cfg: Any, imagebind: Path | None,
                           components: dict[str, Any], bar: Any, log) -> None:
    """llama_proj, one module for every input modality (none without ImageBind: text input only)."""
    from safetensors.torch import save_file

    (tmp / "input_projectors").mkdir()
    w = state["llama_proj.weight"]
    if cfg.encoders:
        tensors = {dst: state[src].contiguous() for src, dst in plan.input.items()}
        for m in cfg.input_projectors:
            save_file(tensors, str(tmp / "input_projectors" / f"{m.value}.safetensors"))
            components["input_projectors"][m.value] = f"input_projectors/{m.value}.safetensors"
        components["encoders"]["imagebind"] = {"kind": "external", "source": str(imagebind)}
        log(f"input projector: llama_proj {w.shape[1]} -> {w.shape[0]}, shared by "
            f"{', '.join(m.value for m in cfg.input_projectors)}; ImageBind from {imagebind}")
    else:
        log("input projector: llama_proj skipped (no --imagebind: the pipeline takes text input only)")
    bar.update(sum(_nbytes(state[k]) for k in plan.input))


def _write_output_projectors(tmp: Path, state: dict[str, torch.Tensor], plan: Any, cfg: Any, delta: Path,
                             components: dict[str, Any], bar: Any, log) -> None:
    """Each output projector, checked key by key against the module it loads into."""
    from safetensors.torch import save_file

    from ..projectors import build_output_projector

    (tmp / "output_projectors").mkdir()
    for m, keys in plan.output.items():
        pcfg = cfg.output_projectors[m]
        with torch.device("meta"):
            expected = build_output_projector(pcfg, plan.hidden).state_dict()
        tensors = {}
        for src, dst in keys.items():
            t = state[src]
            if dst.startswith("queries."):
                t = t[0]  # (1, Q, d) -> (Q, d)
            if dst not in expected or tuple(expected[dst].shape) != tuple(t.shape):
                raise ConversionError(f"{src} {tuple(t.shape)} does not fit {m.value} output projector's "
                                      f"{dst} {None if dst not in expected else tuple(expected[dst].shape)}")
            tensors[dst] = t.contiguous()
        absent = sorted(set(expected) - set(tensors))
        if absent:
            raise ConversionError(f"{delta}: the {m.value} output projector lacks {OUTPUT_PREFIXES[m]}... for "
                                  f"{absent[0]} ({len(absent)} tensors missing)")
        save_file(tensors, str(tmp / "output_projectors" / f"{m.value}.safetensors"))
        components["output_projectors"][m.value] = f"output_projectors/{m.value}.safetensors"
        bar.update(sum(_nbytes(state[k]) for k in keys))
        seq, dim = pcfg.targets["prompt_embeds"]
        log(f"output projector {m.value}: {plan.hidden} -> {pcfg.hidden_dim} ({pcfg.num_encoder_layers} encoder + "
            f"{pcfg.num_layers} decoder layers, {pcfg.num_heads} heads, FFN {pcfg.ffn_dim}) -> {seq} x {dim}; "
            f"generator {cfg.generators[m].pretrained}")


# ------------------------------------------------------------------ CLI
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", help="NExT-GPT's pytorch_model.pt (the delta checkpoint)")
    p.add_argument("--llm", required=True, help="directory of Vicuna-7B v0 in Hugging Face format (the base)")
    p.add_argument("--out", required=True, help="the pipeline directory to write")
    p.add_argument("--imagebind", default=None, help="imagebind_huge.pth (without it: text input only)")
    p.add_argument("--imagebind-preset", default="huge", help="ImageBind architecture preset (default huge)")
    for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        p.add_argument(f"--{m.value}-generator", default=None,
                       help=f"{m.value} generator id or directory (default {DEFAULT_GENERATORS[m]})")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype the LLM runs in (default float16, as NExT-GPT)")
    p.add_argument("--output-heads", type=int, default=NHEAD,
                   help=f"attention heads of the output projectors (not stored in the file; NExT-GPT: {NHEAD})")
    p.add_argument("--lora-alpha", type=int, default=32,
                   help="LoRA alpha (not stored in the file; NExT-GPT: 32, its lora_alpha in the released config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a directory anymodal did not write (never --llm or another input)")


def run(args: argparse.Namespace) -> int:
    convert_nextgpt(args.delta, args.llm, args.out, imagebind=args.imagebind, imagebind_preset=args.imagebind_preset,
                    generators={m: getattr(args, f"{m.value}_generator") for m in
                                (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)},
                    dtype=args.dtype, num_heads=args.output_heads, lora_alpha=args.lora_alpha,
                    progress=not args.no_progress, overwrite=args.overwrite)
    return 0
