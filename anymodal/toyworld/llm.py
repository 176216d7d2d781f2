"""The ``llm`` phase: a tiny Llama pretrained on the world's dialogues, reading the encoder's features.

Its tokenizer is the ``tokenizer`` phase's plus anymodal's signal and turn tokens
(:func:`llm_tokenizer`). It trains on text dialogues and on media dialogues whose media enter as
the frozen encoder's features through input projectors trained beside it (saved to
``out/llm/input_projectors`` for stage 1 to start from). ``LlamaForCausalLM.save_pretrained`` and
the tokenizer go to ``out/llm``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import AnyModalConfig, EncoderConfig, InputProjectorConfig, LLMConfig
from ..modality import Modality
from .manifests import MEDIA_TOKENS, TOY_MODALITIES, draw_dialogue
from ..utils import atomic_write_text
from . import checkers, world
from .loop import (JsonlLog, RunControl, atomic_dir, atomic_save, check_same_config, cosine_lr, count_params, device_of,
                   optimizer_step, train_loop)
from .recipe import LLMPhase
from .tokenizer import load_tokenizer


# The prompts of stages 1 and 2, in the world's own words (the word-level tokenizer knows them; "audio"
# is not a world word and reads as [UNK], consistently in pretraining and in stage 1).
CAPTION_PROMPT = "describe this {modality}"
GENERATION_PROMPT = "{caption}"
GENERATION_RESPONSE = "{caption} {signal}"  # as in the world's dialogues: the caption, then the medium
# anymodal's default chat template (no tokenizer chat template) marks turns with these; they become
# single special tokens of the LLM's tokenizer, so they never read as [UNK]s.
TURN_MARKERS: tuple[str, ...] = ("### Human:", "### Assistant:")


def llm_tokenizer(out: Path, media_tokens: int = MEDIA_TOKENS) -> tuple[Any, Any]:
    """The ``tokenizer`` phase's word-level tokenizer plus anymodal's tokens (turn markers,
    placeholders, every modality's signal tokens), and an :class:`AnyModalProcessor` over it
    configured like the toy pipeline's. Returns ``(tokenizer, processor)``."""
    from ..config import default_signal_tokens
    from ..processor import AnyModalProcessor

    tok = load_tokenizer(Path(out))
    new = [t for t in TURN_MARKERS if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    proc = AnyModalProcessor(tok, {m: default_signal_tokens()[m] for m in TOY_MODALITIES},
                             {m: media_tokens for m in TOY_MODALITIES})
    return tok, proc


def _world_messages(dialogue: world.Dialogue, proc: Any) -> list[Any]:
    """A world dialogue as the stages render it (SampleBuilder): user media -> placeholders, generated
    media -> the modality's signal tokens, EOS closing every assistant turn."""
    from ..processor import Message, signal_token_strings

    eos = proc.tokenizer.eos_token
    msgs = []
    for turn in dialogue.turns:
        pieces = []
        for part in turn["content"]:
            if part["type"] == "text":
                pieces.append(part["text"] + (" " if turn["role"] == "assistant" else ""))
                continue
            m = Modality.parse(part["type"])
            if turn["role"] == "user":
                pieces.append(m.spec.placeholder * proc.media_tokens.get(m, 1))
            else:
                pieces.append("".join(signal_token_strings(m, proc.signal_tokens[m])))
        text = "".join(pieces)
        msgs.append(Message(turn["role"], text + (eos if turn["role"] == "assistant" else "")))
    return msgs


def _caption_messages(spec: world.Spec, stage: int, proc: Any) -> list[Any]:
    """A stage-1 (medium -> caption) or stage-2 (caption -> caption + signal) pair, as the stages render it."""
    from ..processor import Message, signal_token_strings

    m, caption, eos = spec.modality, spec.caption(), proc.tokenizer.eos_token
    if stage == 1:
        user = m.spec.placeholder * proc.media_tokens.get(m, 1) + "\n" + CAPTION_PROMPT.format(modality=m.value)
        return [Message("user", user), Message("assistant", caption + eos)]
    signal = "".join(signal_token_strings(m, proc.signal_tokens[m]))
    return [Message("user", GENERATION_PROMPT.format(caption=caption, modality=m.value)),
            Message("assistant", GENERATION_RESPONSE.format(caption=caption, modality=m.value, signal=signal) + eos)]


def _encode_conversations(convs: Sequence[list[Any]], proc: Any, max_length: int
                          ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token ids and labels (-100 outside assistant turns, as anymodal.training), right-padded and cut
    at ``max_length``, and each conversation's full length in tokens."""
    from ..training.data import IGNORE_INDEX, render_dialogue

    tok = proc.tokenizer
    ids = torch.full((len(convs), max_length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(convs), max_length), IGNORE_INDEX, dtype=torch.long)
    lengths: list[int] = []
    for i, msgs in enumerate(convs):
        text, spans = render_dialogue(proc, msgs)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        lengths.append(len(enc["input_ids"]))
        row = list(enc["input_ids"])[:max_length]
        ids[i, :len(row)] = torch.tensor(row)
        for j, (start, _) in enumerate(enc["offset_mapping"][:max_length]):
            if any(a <= start < b for a, b in spans):
                labels[i, j] = row[j]
    return ids, labels, lengths


# Tasks whose user turn holds a medium; ``LLMPhase.media_dialogues`` adds more of them.
MEDIA_TASKS = ("i2t", "a2t", "v2t", "i2i")


def _user_media(dialogue: world.Dialogue) -> list[world.Spec]:
    """The specs of the media the user gives, in reading order (the order of the placeholders)."""
    return [part["spec"] for turn in dialogue.turns if turn["role"] == "user"
            for part in turn["content"] if part["type"] != "text"]


def _media_item(spec: world.Spec, g: np.random.Generator) -> Any:
    """A rendered medium in the form the pipeline passes to ``encoder.preprocess``."""
    data = world.render(spec, g)
    return (data, world.SAMPLE_RATE) if spec.modality is Modality.AUDIO else data


def _encode_specs(enc: Any, specs: Sequence[world.Spec], g: np.random.Generator, chunk: int = 256,
                  progress: bool = True) -> dict[Modality, torch.Tensor]:
    """Render and encode ``specs`` with the frozen encoder (its own ``preprocess``, the pipeline's path):
    features ``(n_m, tokens, dim)`` per modality, in the order of ``specs``, on the CPU."""
    from tqdm.auto import tqdm

    out: dict[Modality, list[torch.Tensor]] = {}
    by_modality: dict[Modality, list[world.Spec]] = {}
    for spec in specs:
        by_modality.setdefault(spec.modality, []).append(spec)
    enc.eval()
    with tqdm(total=len(specs), desc="llm media", unit="item", dynamic_ncols=True, mininterval=2.0,
              disable=not progress) as bar:
        for m, group in by_modality.items():
            for i in range(0, len(group), chunk):
                items = [_media_item(spec, g) for spec in group[i:i + chunk]]
                with torch.no_grad():
                    out.setdefault(m, []).append(enc(m, enc.preprocess(m, items).to(device_of(enc))).cpu())
                bar.update(len(items))
    return {m: torch.cat(v) for m, v in out.items()}


def _llm_data(cfg: LLMPhase, proc: Any, path: Path, enc: Any, progress: bool = True) -> dict[str, Any]:
    """The pretraining rows: token ids and labels ``(n, max_length)`` (rows that do not fit are left
    out), and per modality the encoder features of every user medium (``feats``) with the row each
    belongs to (``rows``, ascending; within a row in reading order). Cached in ``path``, with the
    hash of the encoder's weights the features came from."""
    import hashlib

    digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in enc.state_dict().values())).hexdigest()
    if path.exists():
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("encoder") == digest:
            return d
    g = np.random.default_rng(cfg.seed)
    if cfg.rephrased or cfg.sessions:  # as the stages' manifests draw them
        dialogues = [draw_dialogue(g, "train", cfg.rephrased, cfg.sessions) for _ in range(cfg.dialogues)]
    else:
        dialogues = [world.sample_dialogue(g, "train", render_media=False) for _ in range(cfg.dialogues)]
    dialogues += [world.sample_dialogue(g, "train", tasks=MEDIA_TASKS, render_media=False)
                  for _ in range(cfg.media_dialogues)]
    convs = [_world_messages(d, proc) for d in dialogues]
    media = [_user_media(d) for d in dialogues]
    for stage in (1, 2):
        for k in range(cfg.caption_turns):
            m = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)[k % 3]
            spec = world.sample_specs(m, 1, g, "train")[0]
            convs.append(_caption_messages(spec, stage, proc))
            media.append([spec] if stage == 1 else [])
    ids, labels, lengths = _encode_conversations(convs, proc, cfg.max_length)
    keep = [i for i, n in enumerate(lengths) if n <= cfg.max_length]  # a cut row could split a medium's positions
    specs = [spec for i in keep for spec in media[i]]
    owners = [k for k, i in enumerate(keep) for _ in media[i]]
    feats = _encode_specs(enc, specs, np.random.default_rng(cfg.seed + 1), progress=progress)
    rows = {m: torch.tensor([o for o, spec in zip(owners, specs) if spec.modality is m], dtype=torch.long)
            for m in feats}
    d = {"ids": ids[keep], "labels": labels[keep], "feats": {m.value: f for m, f in feats.items()},
         "rows": {m.value: r for m, r in rows.items()}, "dropped": len(convs) - len(keep), "encoder": digest}
    atomic_save(d, path)
    return d


def _build_llm(cfg: LLMPhase, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **cfg.model)
        return LlamaForCausalLM(config)


# Tasks whose last assistant turn the text alone determines (media given as input are unseen by a
# text-only LM): the reply must be the caption the prompt or the edit asks for, then the signal block.
TEXT_TASKS = ("t2i", "t2a", "t2v", "edit_image", "edit_audio", "edit_video")


def evaluate_llm(lm: Any, proc: Any, n: int, seed: int, split: str = "heldout") -> dict[str, Any]:
    """Greedy replies to the last user turn of ``n`` dialogues per text-determined task (earlier
    assistant turns given). ``ok``: the reply reads back (``world.parse_caption``) as the target for
    every field the request names, and holds the right signal block; ``exact``: the caption is the
    canonical ``target.caption()``."""
    g = np.random.default_rng(seed)
    tok = proc.tokenizer
    out: dict[str, Any] = {}
    lm.eval()
    for task in TEXT_TASKS:
        ok = exact = 0
        examples = []
        dialogues = [world.sample_dialogue(g, split, tasks=[task], render_media=False) for _ in range(n)]
        prompts = []
        for d in dialogues:
            msgs = _world_messages(d, proc)[:-1]
            prompts.append(proc.format(msgs, add_generation_prompt=True))
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        with torch.no_grad():
            gen = lm.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
        for d, row in zip(dialogues, gen.tolist()):
            m = d.target.modality
            signal = proc.signal_ids[m]
            text = tok.decode(row, skip_special_tokens=True).strip()
            has_signal = any(row[i:i + len(signal)] == signal for i in range(len(row)))
            request = " ".join(p["text"] for p in d.turns[-2]["content"] if p["type"] == "text")
            asked = world.parse_caption(request) if task.startswith("t2") else d.target
            got = world.parse_caption(text)
            ok += bool(has_signal and _agrees(asked, got))
            exact += bool(text.lower() == d.target.caption().lower() and has_signal)  # the tokenizer lowercases
            if len(examples) < 3:
                examples.append({"request": request, "reply": text, "target": d.target.caption(), "signal": has_signal})
        out[task] = {"ok": round(ok / n, 4), "exact": round(exact / n, 4), "n": n, "examples": examples}
    return out


def _agrees(asked: world.Spec | None, got: world.Spec | None) -> bool:
    """``got`` names the same value as ``asked`` for every field ``asked`` names (image defaults filled)."""
    if asked is None or got is None or type(asked) is not type(got):
        return False
    if isinstance(asked, world.ImageSpec):
        asked, got = asked.with_defaults(), got.with_defaults()
    return all(getattr(asked, f) is None or getattr(asked, f) == getattr(got, f) for f in asked.field_names())


# Questions about a given medium: answered from the input projector's positions alone.
MEDIA_DIRECTIONS = ("i2t", "a2t", "v2t")
INPUT_PROJECTORS = "input_projectors"  # out/llm/input_projectors/: <modality>.safetensors + config.json


def encoder_config(out: Path) -> EncoderConfig:
    """The trained ImageBind of ``out/encoder`` as the pipeline configures it (its safetensors + options)."""
    out = Path(out).resolve()
    if not (out / "encoder" / "model.safetensors").is_file():
        raise ValueError(f"no encoder in {out}; run the encoder phase (train_encoder) first")
    meta = json.loads((out / "encoder" / "config.json").read_text())
    return EncoderConfig(type="imagebind", modalities=[Modality.parse(m) for m in meta["modalities"]],
                         pretrained=str(out / "encoder" / "model.safetensors"), options=meta["options"])


def input_projector_config(hidden: int) -> InputProjectorConfig:
    """The toy pipeline's input projector: an MLP onto ``MEDIA_TOKENS`` positions per medium."""
    return InputProjectorConfig(type="mlp", num_tokens=MEDIA_TOKENS, hidden_dim=hidden)


def _media_model(out: Path, cfg: LLMPhase, lm: Any, proc: Any) -> Any:
    """An :class:`AnyModalModel` over ``lm``, the frozen trained encoder and fresh input projectors
    (no generators): the pipeline's own encode/project/splice path for pretraining."""
    import anymodal.encoders  # noqa: F401  (registers the built-in encoder types)

    from ..model import AnyModalModel
    from ..registry import ENCODERS

    e = encoder_config(out)
    config = AnyModalConfig(llm=LLMConfig(model=str(Path(out).resolve() / "llm")), name="toyworld-llm",
                            encoders={"imagebind": e},
                            input_projectors={m: input_projector_config(cfg.projector_hidden) for m in e.modalities})
    encoder = ENCODERS.get(e.type).from_config(e.options, e.modalities, e.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        model = AnyModalModel(config, lm, {"imagebind": encoder}, proc.token_ids())
    model.encoders.requires_grad_(False)
    model.encoders.eval()
    return model


def _batch_media(model: Any, data: dict[str, Any], starts: dict[str, torch.Tensor], idx: torch.Tensor
                 ) -> dict[Modality, torch.Tensor]:
    """Projected features of the media of rows ``idx``, in the order ``model.embed`` scatters them
    (row by row, reading order within a row)."""
    media = {}
    for m, feats in data["feats"].items():
        sel = [torch.arange(int(starts[m][r]), int(starts[m][r + 1])) for r in idx.tolist()]
        sel_t = torch.cat(sel)
        if len(sel_t):
            media[Modality.parse(m)] = model.input_projectors[m](feats[sel_t].to(model.device))
    return media


def evaluate_media(model: Any, proc: Any, n: int, seed: int, split: str = "heldout", batch: int = 20
                   ) -> dict[str, Any]:
    """Greedy answers to ``n`` questions per understanding direction (i2t, a2t, v2t) about a rendered
    medium, through the pipeline's path (encoder ``preprocess``, encoder, input projector,
    :func:`~anymodal.generation.generate_text`), scored by ``checkers.check_answer``."""
    from ..generation import generate_text

    g = np.random.default_rng(seed)
    tok = proc.tokenizer
    out: dict[str, Any] = {}
    model.eval()
    for direction in MEDIA_DIRECTIONS:
        ok, examples = 0, []
        dialogues = [world.sample_dialogue(g, split, tasks=[direction], render_media=False) for _ in range(n)]
        for i in range(0, n, batch):
            chunk = dialogues[i:i + batch]
            prompts = [proc.format(_world_messages(d, proc)[:-1], add_generation_prompt=True) for d in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            m = chunk[0].target.modality
            with torch.no_grad():
                x = model.encoder_for(m).preprocess(m, [_media_item(s, g) for d in chunk for s in _user_media(d)])
                feats = {m: model.encode_media(m, x)}
                res = generate_text(model, proc, enc["input_ids"], enc["attention_mask"], feats, 24)
            for d, row in zip(chunk, res.sequences):
                text = tok.decode(row, skip_special_tokens=True).strip()
                hit = checkers.check_answer(d.question, text, d.target)
                ok += hit
                if len(examples) < 3:
                    examples.append({"question": d.question, "reply": text, "target": d.target.caption(), "ok": hit})
        out[direction] = {"ok": round(ok / n, 4), "n": n, "examples": examples}
    return out


def train_llm(out: Path, cfg: LLMPhase, log: JsonlLog, control: RunControl) -> Path:
    """Pretrain a tiny Llama (in full) with an input projector per modality over the frozen encoder of
    ``out/encoder`` on the world's dialogues, and save it with its tokenizer to ``out/llm`` (the
    projectors in ``out/llm/input_projectors``, where :func:`run_stages` starts stage 1 from them)."""
    from safetensors.torch import save_model

    out = Path(out)
    state_dir = out / "state" / "llm"
    if not (out / "encoder" / "model.safetensors").is_file():
        raise ValueError(f"llm: no trained encoder in {out / 'encoder'}; the LLM is pretrained reading its "
                         "features, so run the encoder phase (train_encoder) first")
    state_dir.mkdir(parents=True, exist_ok=True)
    check_same_config(state_dir / "config.json", asdict(cfg), "llm")
    tok, proc = llm_tokenizer(out)
    lm = _build_llm(cfg, tok)
    # the tokenizer phase's limit is a guess made before the LLM existed; the LLM's positions are the
    # real one. A smaller value makes transformers warn of "indexing errors" on every long session
    # while the data is tokenised here, and on every long chat once saved.
    tok.model_max_length = lm.config.max_position_embeddings
    model = _media_model(out, cfg, lm, proc).to(control.device)
    t0 = time.time()
    data = _llm_data(cfg, proc, state_dir / "data.pt", model.encoders["imagebind"], control.progress)
    ids, labels = data["ids"], data["labels"]
    starts = {m: torch.searchsorted(r, torch.arange(len(ids) + 1)) for m, r in data["rows"].items()}
    projectors = model.input_projectors
    log.write(stage="data", event="texts", n=len(ids), dropped=data["dropped"], vocab=len(tok), params=count_params(lm),
              projector_params=count_params(projectors), media={m: len(r) for m, r in data["rows"].items()},
              longest=int((ids != tok.pad_token_id).sum(1).max()), seconds=round(time.time() - t0, 1))
    params = list(lm.parameters()) + list(projectors.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    pad = tok.pad_token_id

    def step(_: int) -> float:
        idx = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        x, y = ids[idx].to(model.device), labels[idx].to(model.device)
        width = int((x != pad).sum(1).max())
        x, y = x[:, :width], y[:, :width]
        # AnyModalModel.forward: the placeholders' embeddings replaced by the projected features, as in the stages
        loss = model(x, (x != pad).long(), media=_batch_media(model, data, starts, idx), labels=y, use_cache=False).loss
        return optimizer_step(opt, loss, params)

    train_loop(stage="llm", total=cfg.steps, ckpt=state_dir / "llm.ckpt",
               modules={"llm": lm, "input_projectors": projectors}, optimizer=opt, gen=gen, ema=None, step_fn=step,
               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps), log=log,
               checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control)
    model.eval()
    figures = {split: evaluate_llm(lm, proc, cfg.eval_dialogues, cfg.seed + 7000 + k, split)
               | evaluate_media(model, proc, cfg.eval_dialogues, cfg.seed + 8000 + k, split)
               for k, split in enumerate(("train", "heldout"))}
    log.write(stage="llm", step=cfg.steps, event="eval", **figures)
    atomic_write_text(state_dir / "figures.json", json.dumps(figures, indent=2) + "\n")
    lm.generation_config.pad_token_id = pad

    def save(d: Path) -> None:
        lm.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))
        (d / INPUT_PROJECTORS).mkdir()
        for m, proj in projectors.items():
            save_model(proj, str(d / INPUT_PROJECTORS / f"{m}.safetensors"))
        atomic_write_text(d / INPUT_PROJECTORS / "config.json", json.dumps(
            {m.value: asdict(p) for m, p in model.config.input_projectors.items()}, indent=2) + "\n")

    return atomic_dir(out / "llm", save)
