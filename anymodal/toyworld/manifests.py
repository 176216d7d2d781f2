"""The ``manifests`` phase: the toy world's training data as files, in anymodal.training's format.

``out/data`` holds ``media/{image,audio,video}/*`` (PNG, 16-bit WAV, GIF), ``captions.jsonl`` and
``dialogues.jsonl`` (train split), ``heldout-captions.jsonl`` and ``heldout-dialogues.jsonl``, and
``manifest.json`` (the settings); the stages phase writes filtered copies beside them
(:func:`filter_manifest`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..modality import Modality

TOY_MODALITIES = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)  # the toy world's three media kinds
MEDIA_TOKENS = 4  # LLM positions of one input medium (input projectors' num_tokens)
from ..utils import atomic_write_text
from . import world
from .loop import atomic_dir
from .recipe import check_dialogue_mix


def _media_writer(root: Path):
    """A function ``(modality, array) -> relative path`` writing PNG / WAV / GIF files under ``root/media``."""
    import imageio.v3 as iio
    import soundfile as sf
    from PIL import Image

    counters = {m: 0 for m in TOY_MODALITIES}
    for m in TOY_MODALITIES:
        (root / "media" / m.value).mkdir(parents=True, exist_ok=True)

    def write(modality: Modality, data: np.ndarray) -> str:
        k = counters[modality]
        counters[modality] += 1
        ext = {Modality.IMAGE: "png", Modality.AUDIO: "wav", Modality.VIDEO: "gif"}[modality]
        rel = f"media/{modality.value}/{k:06d}.{ext}"
        if modality is Modality.IMAGE:
            Image.fromarray(data).save(root / rel)
        elif modality is Modality.AUDIO:
            sf.write(str(root / rel), data, world.SAMPLE_RATE, subtype="PCM_16")
        else:
            iio.imwrite(root / rel, data, extension=".gif", duration=125, loop=0)
        return rel

    return write


def dialogue_row(dialogue: world.Dialogue, g: np.random.Generator, write) -> dict[str, Any]:
    """A world dialogue as an anymodal.training dialogue row: user media become files, assistant media
    ``{"<modality>": null, "caption": spec.caption()}`` (what the output projector aligns with)."""
    messages = []
    for turn in dialogue.turns:
        content: list[Any] = []
        for part in turn["content"]:
            if part["type"] == "text":
                content.append(part["text"] + (" " if turn["role"] == "assistant" else ""))
                continue
            m = Modality.parse(part["type"])
            if turn["role"] == "user":
                content.append({m.value: write(m, world.render(part["spec"], g))})
            else:
                content.append({m.value: None, "caption": part["spec"].caption()})
        messages.append({"role": turn["role"], "content": content})
    return {"messages": messages, "task": dialogue.task}


# A session longer than this (approximate LLM tokens: words, media positions, signal tokens, turn
# markers) is drawn again: the toy LLM's context is 256 positions, and rows that do not fit are bad rows.
SESSION_TOKEN_LIMIT = 200


def _approx_tokens(d: world.Dialogue) -> int:
    signal = {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24}
    n = 0
    for turn in d.turns:
        n += 3
        for part in turn["content"]:
            if part["type"] == "text":
                n += len(part["text"].replace("?", " ? ").replace(",", " , ").split())
            else:
                n += MEDIA_TOKENS + 2 if turn["role"] == "user" else signal[Modality.parse(part["type"])]
    return n


def draw_dialogue(g: np.random.Generator, split: str, rephrased: float = 0.0, sessions: float = 0.0,
                  forms: str = "train", copies: float = 0.0) -> world.Dialogue:
    """One training dialogue: with probability ``copies`` a copy task (:func:`world.sample_copy`),
    with probability ``sessions`` a multi-turn session (3-5 mixed turns, :func:`world.sample_session`),
    else with probability ``rephrased`` a single-task dialogue asked in one of ``forms``' other ways
    (:func:`world.rephrase`), else a canonical one."""
    if copies and g.random() < copies:
        return world.sample_copy(g)
    r = g.random()
    if r < sessions:
        while True:
            d = world.sample_session(g, split, forms=forms, render_media=False).as_dialogue()
            if _approx_tokens(d) <= SESSION_TOKEN_LIMIT:
                return d
    d = world.sample_dialogue(g, split, render_media=False)
    return world.rephrase(d, g, forms) if r < sessions + rephrased else d


def write_manifests(out: str | os.PathLike, n_captions: int, n_dialogues: int, seed: int = 0,
                    rephrased: float = 0.0, sessions: float = 0.0, copies: float = 0.0, progress: bool = True) -> Path:
    """Render world samples to ``out/data`` and write the manifests anymodal.training reads.

    ``captions.jsonl``: ``n_captions`` caption pairs per modality (image PNG, audio 16-bit WAV, video
    GIF), train split; ``dialogues.jsonl``: ``n_dialogues`` dialogues of every task, train split;
    ``heldout-captions.jsonl`` / ``heldout-dialogues.jsonl``: a tenth as many (at least 2) from the
    held-out combinations. Deterministic in ``seed``; written beside ``out/data`` and swapped in, and
    skipped when ``out/data`` already holds manifests made with the same settings.
    """
    out = Path(out)
    settings = {"n_captions": int(n_captions), "n_dialogues": int(n_dialogues), "seed": int(seed), "version": 1}
    if rephrased or sessions or copies:
        check_dialogue_mix(rephrased, sessions, copies)
        settings.update(rephrased=float(rephrased), sessions=float(sessions), version=2)
        if copies:
            settings["copies"] = float(copies)
    done = out / "data" / "manifest.json"
    if done.exists() and json.loads(done.read_text()).get("settings") == settings:
        return out / "data"
    if n_captions < 1 or n_dialogues < 1:
        raise ValueError(f"n_captions and n_dialogues must be positive, got {n_captions}, {n_dialogues}")
    from tqdm.auto import tqdm

    def build(root: Path) -> None:
        write = _media_writer(root)
        g = np.random.default_rng(seed)
        counts: dict[str, int] = {}
        n_held_c, n_held_d = max(2, n_captions // 10), max(2, n_dialogues // 10)
        jobs = [("captions.jsonl", "train", n_captions, 0), ("dialogues.jsonl", "train", 0, n_dialogues),
                ("heldout-captions.jsonl", "heldout", n_held_c, 0), ("heldout-dialogues.jsonl", "heldout", 0, n_held_d)]
        total = sum(3 * c + d for _, _, c, d in jobs)
        with tqdm(total=total, desc="manifests", unit="row", dynamic_ncols=True, mininterval=2.0,
                  disable=not progress) as bar:
            for name, split, n_cap, n_dia in jobs:
                rows = []
                for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
                    for _ in range(n_cap):
                        s = world.sample(m, g, split)
                        rows.append({"modality": m.value, "media": write(m, s.data), "caption": s.caption,
                                     "spec": s.spec.to_dict()})
                        bar.update(1)
                for _ in range(n_dia):
                    d = draw_dialogue(g, split, rephrased, sessions, copies=copies)
                    rows.append(dialogue_row(d, g, write))
                    bar.update(1)
                atomic_write_text(root / name, "".join(json.dumps(r) + "\n" for r in rows))
                counts[name] = len(rows)
        atomic_write_text(root / "manifest.json", json.dumps({"settings": settings, "rows": counts}, indent=2) + "\n")

    return atomic_dir(out / "data", build)


def filter_manifest(src: Path, dst: Path, inputs: Sequence[Modality], outputs: Sequence[Modality],
                    captions: str = "input") -> Path:
    """Copy the rows of ``src`` that a model reading ``inputs`` and generating ``outputs`` can train on:
    caption pairs of a modality in ``inputs`` (``captions="input"``, stage 1) or in ``outputs``
    (``"output"``, stage 2); dialogues whose user media are all readable and whose assistant media are
    all generable. Rows left out are not bad rows, just not this model's. Written atomically (put
    ``dst`` beside ``src`` so that relative media paths still hold)."""
    if captions not in ("input", "output"):
        raise ValueError(f"captions must be 'input' or 'output', got {captions!r}")
    ins, outs = {Modality.parse(m).value for m in inputs}, {Modality.parse(m).value for m in outputs}
    kept = []
    for line in src.read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            ok = True
            for msg in row["messages"]:
                items = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
                for item in items:
                    if isinstance(item, dict):
                        key = next(k for k in item if k != "caption")
                        ok = ok and key in (ins if msg["role"] == "user" else outs)
        else:
            ok = row["modality"] in (ins if captions == "input" else outs)
        if ok:
            kept.append(line)
    if not kept:
        raise ValueError(f"{src}: no row fits a model reading {sorted(ins)} and generating {sorted(outs)}")
    atomic_write_text(dst, "".join(line + "\n" for line in kept))
    return dst
