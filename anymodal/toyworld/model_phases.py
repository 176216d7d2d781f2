"""The model side of the toy-world default: data manifests, a tiny ImageBind, a tiny Llama, the three
anymodal stages on top, and shipping the result.

Plain functions in the style of :mod:`anymodal.toyworld.train`'s phases (``fn(out, cfg, log, control)
-> Path``; resumable from their last checkpoint; tqdm progress; atomic writes). They reuse that
module's machinery (:class:`~anymodal.toyworld.train.JsonlLog`, :class:`~anymodal.toyworld.train.RunControl`,
:func:`~anymodal.toyworld.train.train_loop`, :func:`~anymodal.toyworld.train.atomic_dir`,
:func:`~anymodal.toyworld.train.load_tokenizer`). ``anymodal toyworld train`` runs them as the phases
``manifests``, ``encoder``, ``llm`` and ``stages``; ``anymodal toyworld ship`` runs :func:`ship`.

    write_manifests(out, n_captions, n_dialogues, seed)   out/data/: PNG, WAV and GIF files plus the
                                                           caption-pair and dialogue JSONL manifests that
                                                           anymodal.training reads (train split), and
                                                           held-out ones (heldout-*.jsonl)
    train_encoder(out, cfg.encoder, log, control)          out/encoder/: a tiny ImageBind (our
                                                           encoders/imagebind.py) trained with one linear
                                                           classifier per world field on its pooled
                                                           embedding; linear probes on held-out pairs
    train_llm(out, cfg.llm, log, control)                  out/llm/: a tiny LlamaForCausalLM and its
                                                           tokenizer (the word-level one of the
                                                           ``tokenizer`` phase plus anymodal's tokens)
    build_toy_config(out, cfg)                             the AnyModalConfig over those components and
                                                           the generators of out/image-generator and
                                                           out/audio-generator (a missing one is skipped)
    run_stages(out, cfg.stages, log, control)              anymodal stages 1, 2, 3 (out/stages/stage<N>),
                                                           LoRA merged, saved to out/final
    ship(out, dest)                                        out/final with every component copied
                                                           (save_frozen=True) into ``dest``, weights
                                                           stored as float16, <= 25 MB

Layout of ``out`` (next to the ``tokenizer``/``image-generator``/``audio-generator`` of train.py)
    data/            media/{image,audio,video}/*, captions.jsonl, dialogues.jsonl, heldout-captions.jsonl,
                     heldout-dialogues.jsonl, and per-stage filtered copies (stage2-captions.jsonl,
                     stage3-dialogues.jsonl) written by run_stages; manifest.json records the settings
    encoder/         ``ImageBindEncoder.save_pretrained`` (config.json + model.safetensors); the
                     safetensors file loads through ``EncoderConfig(pretrained=.../model.safetensors)``
    llm/             ``LlamaForCausalLM.save_pretrained`` + its tokenizer
    stages/stage<N>/ anymodal.training runs (checkpoints/, metrics.jsonl, final/); stage3/merged/
    final/           the assembled pipeline (``AnyModalPipeline.from_pretrained(out / "final")``)
    state/<phase>/   checkpoints, cached data and ``figures.json``
    logs/<phase>.jsonl
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import (AnyModalConfig, EncoderConfig, GeneratorConfig, InputProjectorConfig, LLMConfig,
                      OutputProjectorConfig)
from ..modality import MEDIA_MODALITIES, Modality
from ..utils import atomic_write_text
from . import world
from .train import (JsonlLog, RunControl, Stop, atomic_dir, atomic_save, check_same_config, cosine_lr, device_of,
                    load_tokenizer, train_loop)

MODEL_PHASES: tuple[str, ...] = ("manifests", "encoder", "llm", "stages")
SHIP_LIMIT_BYTES = 25_000_000  # the 25 MB, decimal

# The prompts of stages 1 and 2, in the world's own words (the word-level tokenizer knows them; "audio"
# is not a world word and reads as [UNK], consistently in pretraining and in stage 1).
CAPTION_PROMPT = "describe this {modality}"
GENERATION_PROMPT = "{caption}"
GENERATION_RESPONSE = "{caption} {signal}"  # as in the world's dialogues: the caption, then the medium
# anymodal's default chat template (no tokenizer chat template) marks turns with these; they become
# single special tokens of the LLM's tokenizer, so they never read as [UNK]s.
TURN_MARKERS: tuple[str, ...] = ("### Human:", "### Assistant:")
MEDIA_TOKENS = 4  # LLM positions of one input medium (input projectors' num_tokens)

_IMAGE_FIELDS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "size": tuple(world.SIZES),
                 "position": tuple(world.POSITIONS), "background": tuple(world.BACKGROUNDS)}
_AUDIO_FIELDS = {"note": tuple(world.NOTES), "waveform": world.WAVEFORMS, "duration": tuple(world.DURATIONS)}
_VIDEO_FIELDS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "direction": tuple(world.DIRECTIONS)}
FIELDS: dict[Modality, dict[str, tuple[str, ...]]] = {Modality.IMAGE: _IMAGE_FIELDS, Modality.AUDIO: _AUDIO_FIELDS,
                                                      Modality.VIDEO: _VIDEO_FIELDS}


# ============================================================================ settings


def _default_encoder_options() -> dict[str, Any]:
    """A tiny ImageBind for the world: 64 px vision (the 32 px videos are upscaled; patch 8: 64 tubes
    of 2 frames; three blocks), a 128-band fbank of one 1.024 s clip (patch 16, stride 10: 12 x 9
    patches; two blocks), width 64, a 64-d joint space. ``text`` is never built (no text modality).
    Against 32 px with patch 4 and two vision blocks (1,500 steps at 1e-3), this lifted seen-split shape
    accuracy from 51% to 84% and held-out direction from 93% to 99%."""
    return {"out_embed_dim": 64,
            "vision": {"embed_dim": 64, "depth": 3, "num_heads": 4, "drop_path": 0.0},
            "audio": {"embed_dim": 64, "depth": 2, "num_heads": 4, "drop_path": 0.0},
            "text": {"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path": 0.0},
            "mlp_ratio": 2, "image_size": 64, "patch_size": 8, "video_frames": 2, "video_clips": 2,
            # The world's videos are 8 bare frames: two equal segments, one centre crop (ImageBind's
            # 2 s windows and three crops are for real videos with a frame rate); see docs/imagebind.md.
            "video_crops": 1, "video_sampling": "segments",
            "num_mel_bins": 128, "audio_target_len": 100, "audio_patch_size": 16, "audio_patch_stride": 10,
            "audio_sample_rate": world.SAMPLE_RATE, "audio_clip_duration": world.CLIP_SAMPLES / world.SAMPLE_RATE,
            "audio_clips": 1, "audio_channel": "mean", "audio_demean": "per_clip",
            "text_context_length": 16, "text_vocab_size": 128}


@dataclass
class EncoderPhase:
    """The tiny ImageBind and its training: one linear classifier per world field on the pooled
    embedding (cross-entropy, summed over fields and modalities), AdamW with warm-up + cosine."""

    seed: int = 0
    options: dict[str, Any] = field(default_factory=_default_encoder_options)
    bank_size: int = 2048  # renders per modality (train split, jittered), preprocessed once
    steps: int = 1600  # about 5 minutes on one free core, 11 on a shared one
    batch_size: int = 32  # per modality and step
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    log_every: int = 10
    probe_samples: int = 512  # per modality and split for the final linear probes
    probe_steps: int = 300
    # Extra renders per modality, as a fraction of bank_size, changed off the world in colour and/or
    # shape (images, videos) or pitch and/or timbre (audio), with those fields' losses masked (see
    # _augmented_bank): held-out combinations (a blue triangle, an E4 sawtooth) need colour read apart
    # from shape and pitch apart from timbre. 0 turns it off.
    augment_fraction: float = 1.0
    # Learn shape (images, videos) only from the augmented renders painted off the palette: the world
    # renders keep their other labels but not their shape's, so the shape classifier never sees a
    # palette colour and cannot learn that one colour is never a given shape (the held-out pairs).
    shape_off_palette_only: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.augment_fraction <= 4.0:
            raise ValueError(f"encoder.augment_fraction must be in [0, 4], got {self.augment_fraction!r}")
        if self.shape_off_palette_only and self.augment_fraction <= 0:
            raise ValueError("encoder.shape_off_palette_only needs augmented renders (encoder.augment_fraction > 0): "
                             "they are then the only renders that teach shape")


def _default_llm() -> dict[str, Any]:
    # LlamaConfig kwargs; vocabulary size and special ids come from the tokenizer.
    return {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5}


@dataclass
class LLMPhase:
    """The tiny Llama: pretrained in full as a causal LM on world dialogues rendered exactly as the
    stages render them (signal tokens for generated media), plus stage-1 (medium -> caption) and
    stage-2 (caption -> caption + signal) turns, loss on assistant turns. Media in the loop: the
    frozen ``encoder`` phase's ImageBind and an input projector (trained with the LLM, kept for
    stage 1) fill the placeholder positions through :class:`~anymodal.model.AnyModalModel`."""

    seed: int = 0
    model: dict[str, Any] = field(default_factory=_default_llm)
    dialogues: int = 12000  # train-split dialogues of every task
    media_dialogues: int = 6000  # more of the tasks that read a medium (i2t, a2t, v2t, i2i)
    caption_turns: int = 3000  # stage-1 and stage-2 style turns each
    projector_hidden: int = 128  # the MLP input projectors' width (MEDIA_TOKENS positions per medium)
    max_length: int = 96
    steps: int = 3000  # 18 minutes at 2.6 steps/s on the loaded 2-core machine (see docs/toyworld.md)
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 200
    log_every: int = 10
    eval_dialogues: int = 40  # dialogues per text-determined task and per understanding direction at the end


@dataclass
class StagesPhase:
    """The three anymodal stages on the trained components (anymodal.training.train settings)."""

    n_captions: int = 1500  # per modality, for write_manifests
    n_dialogues: int = 3000
    seed: int = 0
    stage1_steps: int = 800  # ~15 steps/s on one core (stage 3 ~7): about 8 minutes in all
    stage2_steps: int = 3000  # 800 left the image projector far from its targets (align 2.1 against 1.0)
    stage3_steps: int = 2500
    batch_size: int = 16
    lr: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)
    warmup_steps: int = 20
    # r 16 on every linear layer (stage-3 loss 0.50 vs 1.00 with r 8 on attention, 1,500 steps at 5e-4;
    # held-out i2t 22% vs 14%, a2t 22% vs 12%, v2t 30% vs 40%, n=100 each)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    save_every: int = 50
    projector_hidden: int = 128  # output projectors; input projectors too unless the llm phase's are carried
    # start stage 1 from the input projectors the llm phase trained with the LLM (out/llm/input_projectors)
    carry_input_projectors: bool = True
    output_layers: int = 1  # two layers of width 128 cost 2.2 MB per projector (the ship limit is tight)
    # > 0: stage 2 adds the frozen generators' denoising loss for these outputs (training.denoise_*).
    # Video only: held-out t2v 86% -> 98% (n=100; stage 2 216 s -> 608 s); with images too, held-out
    # t2i did not move (19% -> 20%) and stage 2 took 948 s (docs/toyworld.md, "Stage-2 denoising loss").
    stage2_denoise_weight: float = 4.0
    denoise_modalities: tuple[str, ...] = ("video",)
    max_new_tokens: int = 40
    eval_prompts: int = 20  # per direction, for anymodal eval on out/final once the stages are done
    image_settings: dict[str, Any] = field(default_factory=lambda: {"num_inference_steps": 20, "guidance_scale": 3.0})
    audio_settings: dict[str, Any] = field(default_factory=lambda: {
        "num_inference_steps": 20, "guidance_scale": 3.0,
        "audio_length_s": world.CLIP_SAMPLES / world.SAMPLE_RATE})
    video_settings: dict[str, Any] = field(default_factory=lambda: {
        "num_inference_steps": 20, "guidance_scale": 3.0, "num_frames": world.VIDEO_FRAMES,
        "height": world.VIDEO_SIZE, "width": world.VIDEO_SIZE})

    def __post_init__(self) -> None:
        if self.stage2_denoise_weight < 0:
            raise ValueError(f"stages.stage2_denoise_weight must be >= 0, got {self.stage2_denoise_weight}")
        from ..training.config import DENOISE_MODALITIES

        bad = [m for m in self.denoise_modalities if m not in DENOISE_MODALITIES]
        if bad or not self.denoise_modalities:
            raise ValueError(f"stages.denoise_modalities must name image and/or video (the generators with a "
                             f"denoising loss), got {list(self.denoise_modalities)}")


@dataclass
class ModelPhasesConfig:
    encoder: EncoderPhase = field(default_factory=EncoderPhase)
    llm: LLMPhase = field(default_factory=LLMPhase)
    stages: StagesPhase = field(default_factory=StagesPhase)

    @classmethod
    def preset(cls, name: str) -> "ModelPhasesConfig":
        if name == "default":
            return cls()
        if name == "smoke":
            opts = _default_encoder_options()
            for b in ("vision", "audio"):
                opts[b] = {"embed_dim": 16, "depth": 1, "num_heads": 2, "drop_path": 0.0}
            opts["out_embed_dim"] = 16
            llm = _default_llm() | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "num_key_value_heads": 1}
            return cls(EncoderPhase(options=opts, bank_size=24, steps=4, batch_size=4, warmup_steps=1,
                                    checkpoint_every=2, log_every=1, probe_samples=16, probe_steps=5),
                       LLMPhase(model=llm, dialogues=60, media_dialogues=12, caption_turns=20, projector_hidden=16,
                                steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                                eval_dialogues=2),
                       StagesPhase(n_captions=8, n_dialogues=16, stage1_steps=2, stage2_steps=2, stage3_steps=2,
                                   batch_size=4, warmup_steps=0, save_every=1, projector_hidden=16, output_layers=1,
                                   max_new_tokens=24, eval_prompts=1,
                                   image_settings={"num_inference_steps": 2, "guidance_scale": 3.0},
                                   audio_settings={"num_inference_steps": 2, "guidance_scale": 3.0,
                                                   "audio_length_s": world.CLIP_SAMPLES / world.SAMPLE_RATE},
                                   video_settings={"num_inference_steps": 2, "guidance_scale": 3.0,
                                                   "num_frames": world.VIDEO_FRAMES, "height": world.VIDEO_SIZE,
                                                   "width": world.VIDEO_SIZE}))
        raise ValueError(f"unknown preset {name!r}; expected default or smoke")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ============================================================================ 1. manifests


def _media_writer(root: Path):
    """A function ``(modality, array) -> relative path`` writing PNG / WAV / GIF files under ``root/media``."""
    import imageio.v3 as iio
    import soundfile as sf
    from PIL import Image

    counters = {m: 0 for m in MEDIA_MODALITIES}
    for m in MEDIA_MODALITIES:
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


def write_manifests(out: str | os.PathLike, n_captions: int, n_dialogues: int, seed: int = 0) -> Path:
    """Render world samples to ``out/data`` and write the manifests anymodal.training reads.

    ``captions.jsonl``: ``n_captions`` caption pairs per modality (image PNG, audio 16-bit WAV, video
    GIF), train split; ``dialogues.jsonl``: ``n_dialogues`` dialogues of every task, train split;
    ``heldout-captions.jsonl`` / ``heldout-dialogues.jsonl``: a tenth as many (at least 2) from the
    held-out combinations. Deterministic in ``seed``; written beside ``out/data`` and swapped in, and
    skipped when ``out/data`` already holds manifests made with the same settings.
    """
    out = Path(out)
    settings = {"n_captions": int(n_captions), "n_dialogues": int(n_dialogues), "seed": int(seed), "version": 1}
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
        with tqdm(total=total, desc="manifests", unit="row", dynamic_ncols=True, mininterval=2.0) as bar:
            for name, split, n_cap, n_dia in jobs:
                rows = []
                for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
                    for _ in range(n_cap):
                        s = world.sample(m, g, split)
                        rows.append({"modality": m.value, "media": write(m, s.data), "caption": s.caption,
                                     "spec": s.spec.to_dict()})
                        bar.update(1)
                for _ in range(n_dia):
                    d = world.sample_dialogue(g, split, render_media=False)
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


# ============================================================================ 2. encoder


def _encoder_bank(enc: Any, cfg: EncoderPhase, n: int, split: str, seed: int, path: Path | None
                  ) -> dict[Modality, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Render ``n`` samples per modality, preprocess them with the encoder's own ``preprocess`` (the
    pipeline's path) and label each world field; cached in ``path`` when given."""
    if path is not None and path.exists():
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return {Modality.parse(k): (v["x"], v["y"]) for k, v in raw.items()}
    out = {}
    for k, m in enumerate((Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)):
        bank = world.make_bank(m, n, split, seed=seed + 10 * k)
        items: list[Any] = ([(w, world.SAMPLE_RATE) for w in bank.data] if m is Modality.AUDIO else list(bank.data))
        x = torch.cat([enc.preprocess(m, items[i:i + 256]) for i in range(0, len(items), 256)])
        y = {f: torch.tensor([values.index(getattr(s, f)) for s in bank.specs]) for f, values in FIELDS[m].items()}
        out[m] = (x, y)
    if path is not None:
        atomic_save({m.value: {"x": x, "y": y} for m, (x, y) in out.items()}, path)
    return out


# Hue bands (degrees) at least 15 degrees from every palette colour's hue (red 0, orange 31,
# yellow 56, green 128, blue 228, purple 287; white has no hue).
_OFF_PALETTE_HUES = ((71.0, 113.0), (143.0, 213.0), (243.0, 272.0), (302.0, 345.0))
_OFF_GRID_SEMITONES = 0.75  # the least distance of an augmented pitch from every world note


def off_palette_rgb(g: np.random.Generator) -> tuple[float, float, float]:
    """A saturated colour whose hue lies in none of the palette's colours' neighbourhoods."""
    widths = np.array([b - a for a, b in _OFF_PALETTE_HUES])
    band = _OFF_PALETTE_HUES[int(g.choice(len(widths), p=widths / widths.sum()))]
    hue = g.uniform(*band) / 360.0
    r, gr, b = colorsys.hsv_to_rgb(hue, g.uniform(0.6, 1.0), g.uniform(0.7, 1.0))
    return (255.0 * r, 255.0 * gr, 255.0 * b)


def off_grid_frequency(g: np.random.Generator) -> float:
    """A pitch within the notes' range, at least ``_OFF_GRID_SEMITONES`` from every world note
    (on an eighth-semitone grid, which keeps the renderer's wavetable cache small)."""
    notes = 12.0 * np.log2(np.array(list(world.NOTES.values())) / 440.0)
    grid = np.arange(notes.min(), notes.max() + 1e-9, 0.125)
    ok = grid[np.abs(grid[:, None] - notes[None, :]).min(1) >= _OFF_GRID_SEMITONES - 1e-9]
    return float(440.0 * 2.0 ** (g.choice(ok) / 12.0))


def off_world_harmonics(g: np.random.Generator) -> tuple[float, ...]:
    """A timbre that is none of the world's waveforms: random harmonic amplitudes, 1/k^p decay with
    p in [0.5, 3], odd and even harmonics weighted apart (a sine, a square and a sawtooth have
    none, only odd and all harmonics at 1/k)."""
    k = np.arange(1, 25)
    amp = k ** -g.uniform(0.5, 3.0) * np.where(k % 2 == 0, g.uniform(0.15, 0.7), 1.0)
    amp[1:] *= g.uniform(0.6, 1.4, size=len(amp) - 1)
    return tuple(float(a) for a in np.round(amp, 2))  # rounded: a small wavetable cache


def _augmented_bank(enc: Any, n: int, seed: int, path: Path | None
                    ) -> dict[Modality, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Like :func:`_encoder_bank` (train split), but each render is changed off the world in one or
    both of two fields, whose labels become ``-100`` (ignored by the loss): images and videos are
    painted off the palette and/or drawn as an off-world shape (:data:`world.AUGMENT_SHAPES`); tones
    are played off the note grid and/or with an off-world timbre. So colour is read apart from
    shape and pitch apart from timbre, which held-out combinations need."""
    if path is not None and path.exists():
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return {Modality.parse(k): (v["x"], v["y"]) for k, v in raw.items()}
    out = {}
    for k, m in enumerate((Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)):
        g = np.random.default_rng(seed + 10 * k)
        specs = world.sample_specs(m, n, g, "train")
        # per sample: change the first field (colour / note), the second (shape / waveform) or both
        which = g.integers(0, 3, size=n)
        first = {Modality.IMAGE: "colour", Modality.AUDIO: "note", Modality.VIDEO: "colour"}[m]
        second = {Modality.IMAGE: "shape", Modality.AUDIO: "waveform", Modality.VIDEO: "shape"}[m]
        items: list[Any] = []
        for s, w in zip(specs, which):
            a, b = w != 1, w != 0  # 0: first only, 1: second only, 2: both
            if m is Modality.AUDIO:
                wave = world.render_audio(s, g, frequency=off_grid_frequency(g) if a else None,
                                          harmonics=off_world_harmonics(g) if b else None)
                items.append((wave, world.SAMPLE_RATE))
            else:
                render = world.render_image if m is Modality.IMAGE else world.render_video
                items.append(render(s, g, rgb=off_palette_rgb(g) if a else None,
                                    shape=str(g.choice(world.AUGMENT_SHAPES)) if b else None))
        x = torch.cat([enc.preprocess(m, items[i:i + 256]) for i in range(0, len(items), 256)])
        y = {f: torch.tensor([values.index(getattr(s, f)) for s in specs]) for f, values in FIELDS[m].items()}
        y[first][torch.from_numpy(which != 1)] = -100
        y[second][torch.from_numpy(which != 0)] = -100
        out[m] = (x, y)
    if path is not None:
        atomic_save({m.value: {"x": x, "y": y} for m, (x, y) in out.items()}, path)
    return out


def _heads(dim: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({f"{m.value}_{f}": torch.nn.Linear(dim, len(values))
                                for m, fs in FIELDS.items() for f, values in fs.items()})


def _embed(enc: Any, m: Modality, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The pooled embeddings of ``x`` (on the encoder's device), returned on the CPU."""
    device = device_of(enc)
    with torch.no_grad():
        return torch.cat([enc(m, x[i:i + batch].to(device))[:, 0].cpu() for i in range(0, len(x), batch)])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, steps: int, seed: int = 0) -> float:
    """Accuracy on ``test`` of a logistic regression fitted on ``train`` (standardised features, Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        probe = torch.nn.Linear(a.shape[1], classes)
        opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
        for _ in range(steps):
            loss = F.cross_entropy(probe(a), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe(b).argmax(-1) == test_y).float().mean())


def evaluate_encoder(enc: Any, heads: torch.nn.ModuleDict | None, cfg: EncoderPhase) -> dict[str, Any]:
    """Per-field accuracy of linear probes fitted on fresh train-split embeddings (``probe``) and of
    the training classifiers (``head``), scored on other train-split samples (``seen``) and on the
    held-out combinations (``heldout``: colour x shape, note x waveform, colour x direction pairs)."""
    n = cfg.probe_samples
    fit = _encoder_bank(enc, cfg, n, "train", cfg.seed + 5000, None)
    scored = {"seen": _encoder_bank(enc, cfg, n, "train", cfg.seed + 9000, None),
              "heldout": _encoder_bank(enc, cfg, n, "heldout", cfg.seed + 6000, None)}
    figures: dict[str, Any] = {split: {} for split in scored}
    enc.eval()
    for m in FIELDS:
        ea = _embed(enc, m, fit[m][0])
        for split, bank in scored.items():
            eb = _embed(enc, m, bank[m][0])
            row: dict[str, Any] = {}
            for f, values in FIELDS[m].items():
                ya, yb = fit[m][1][f], bank[m][1][f]
                row[f] = {"probe": round(linear_probe(ea, ya, eb, yb, len(values), cfg.probe_steps, cfg.seed), 4)}
                if heads is not None:
                    with torch.no_grad():
                        hit = heads[f"{m.value}_{f}"](eb.to(device_of(heads))).argmax(-1).cpu() == yb
                    row[f]["head"] = round(float(hit.float().mean()), 4)
            figures[split][m.value] = row
    return figures | {"n_per_split": n, "note": "probes fit on train-split embeddings"}


def train_encoder(out: Path, cfg: EncoderPhase, log: JsonlLog, control: RunControl) -> Path:
    """Train a tiny ImageBind on the world (train split) and save it to ``out/encoder``."""
    from anymodal.encoders import ImageBindEncoder, ImageBindOptions

    out = Path(out)
    state_dir = out / "state" / "encoder"
    state_dir.mkdir(parents=True, exist_ok=True)
    check_same_config(state_dir / "config.json", asdict(cfg), "encoder")
    opts = ImageBindOptions.from_dict(cfg.options)
    modalities = [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        enc = ImageBindEncoder(opts, modalities)
        heads = _heads(opts.out_embed_dim)
    device = torch.device(control.device)
    enc.to(device)
    heads.to(device)
    t0 = time.time()
    bank = _encoder_bank(enc, cfg, cfg.bank_size, "train", cfg.seed, state_dir / "bank.pt")
    n_aug = int(round(cfg.augment_fraction * cfg.bank_size))
    if cfg.shape_off_palette_only:  # keep the world renders' other labels; shape comes from the augmented ones
        bank = {m: (x, {f: torch.full_like(t, -100) if f == "shape" else t for f, t in y.items()})
                for m, (x, y) in bank.items()}
    if n_aug:
        aug = _augmented_bank(enc, n_aug, cfg.seed + 7000, state_dir / "bank-augmented.pt")
        bank = {m: (torch.cat([x, aug[m][0]]), {f: torch.cat([y[f], aug[m][1][f]]) for f in y})
                for m, (x, y) in bank.items()}
    log.write(stage="data", event="bank", n_per_modality=cfg.bank_size, augmented_per_modality=n_aug,
              split="train", seconds=round(time.time() - t0, 1),
              params={"encoder": _params(enc), "heads": _params(heads)})

    params = list(enc.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device

    def step(_: int) -> float:
        loss = torch.zeros((), device=device)
        for m, (x, y) in bank.items():
            idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
            emb = enc(m, x[idx].to(device))[:, 0]
            for f in FIELDS[m]:
                target = y[f][idx].to(device)
                if bool((target != -100).any()):  # a batch of augmented renders only has no colour/note labels
                    loss = loss + F.cross_entropy(heads[f"{m.value}_{f}"](emb), target) / len(FIELDS[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    train_loop(stage="encoder", total=cfg.steps, ckpt=state_dir / "encoder.ckpt",
               modules={"encoder": enc, "heads": heads}, optimizer=opt, gen=gen, ema=None, step_fn=step,
               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps), log=log,
               checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control)
    enc.eval()
    figures = evaluate_encoder(enc, heads, cfg)
    log.write(stage="encoder", step=cfg.steps, event="eval", **figures)
    atomic_write_text(state_dir / "figures.json", json.dumps(figures, indent=2) + "\n")
    return atomic_dir(out / "encoder", enc.save_pretrained)


# ============================================================================ 3. LLM


def llm_tokenizer(out: Path, media_tokens: int = MEDIA_TOKENS) -> tuple[Any, Any]:
    """The ``tokenizer`` phase's word-level tokenizer plus anymodal's tokens (turn markers,
    placeholders, every modality's signal tokens), and an :class:`AnyModalProcessor` over it
    configured like the toy pipeline's. Returns ``(tokenizer, processor)``."""
    from ..config import DEFAULT_SIGNAL_TOKENS
    from ..processor import AnyModalProcessor

    tok = load_tokenizer(Path(out))
    new = [t for t in TURN_MARKERS if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    proc = AnyModalProcessor(tok, dict(DEFAULT_SIGNAL_TOKENS), {m: media_tokens for m in MEDIA_MODALITIES})
    return tok, proc


def _world_messages(dialogue: world.Dialogue, proc: Any) -> list[Any]:
    """A world dialogue as the stages render it (SampleBuilder): user media -> placeholders, generated
    media -> the modality's signal tokens, EOS closing every assistant turn."""
    from ..processor import PLACEHOLDERS, Message, signal_token_strings

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
                pieces.append(PLACEHOLDERS[m] * proc.media_tokens.get(m, 1))
            else:
                pieces.append("".join(signal_token_strings(m, proc.signal_tokens[m])))
        text = "".join(pieces)
        msgs.append(Message(turn["role"], text + (eos if turn["role"] == "assistant" else "")))
    return msgs


def _caption_messages(spec: world.Spec, stage: int, proc: Any) -> list[Any]:
    """A stage-1 (medium -> caption) or stage-2 (caption -> caption + signal) pair, as the stages render it."""
    from ..processor import PLACEHOLDERS, Message, signal_token_strings

    m, caption, eos = spec.modality, spec.caption(), proc.tokenizer.eos_token
    if stage == 1:
        user = PLACEHOLDERS[m] * proc.media_tokens.get(m, 1) + "\n" + CAPTION_PROMPT.format(modality=m.value)
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


def _encode_specs(enc: Any, specs: Sequence[world.Spec], g: np.random.Generator, chunk: int = 256
                  ) -> dict[Modality, torch.Tensor]:
    """Render and encode ``specs`` with the frozen encoder (its own ``preprocess``, the pipeline's path):
    features ``(n_m, tokens, dim)`` per modality, in the order of ``specs``, on the CPU."""
    from tqdm.auto import tqdm

    out: dict[Modality, list[torch.Tensor]] = {}
    by_modality: dict[Modality, list[world.Spec]] = {}
    for spec in specs:
        by_modality.setdefault(spec.modality, []).append(spec)
    enc.eval()
    with tqdm(total=len(specs), desc="llm media", unit="item", dynamic_ncols=True, mininterval=2.0) as bar:
        for m, group in by_modality.items():
            for i in range(0, len(group), chunk):
                items = [_media_item(spec, g) for spec in group[i:i + chunk]]
                with torch.no_grad():
                    out.setdefault(m, []).append(enc(m, enc.preprocess(m, items).to(device_of(enc))).cpu())
                bar.update(len(items))
    return {m: torch.cat(v) for m, v in out.items()}


def _llm_data(cfg: LLMPhase, proc: Any, path: Path, enc: Any) -> dict[str, Any]:
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
    feats = _encode_specs(enc, specs, np.random.default_rng(cfg.seed + 1))
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


def _encoder_config(out: Path) -> EncoderConfig:
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
    from ..model import AnyModalModel
    from ..registry import ENCODERS, _load_builtin

    _load_builtin()
    e = _encoder_config(out)
    config = AnyModalConfig(llm=LLMConfig(model=str(Path(out).resolve() / "llm")), name="toyworld-llm",
                            encoders={"imagebind": e},
                            input_projectors={m: input_projector_config(cfg.projector_hidden) for m in e.modalities})
    encoder = ENCODERS.get(e.type).from_config(e.options, e.modalities, e.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        model = AnyModalModel(config, lm, {"imagebind": encoder}, proc)
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
    from . import checkers

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
    model = _media_model(out, cfg, lm, proc).to(control.device)
    t0 = time.time()
    data = _llm_data(cfg, proc, state_dir / "data.pt", model.encoders["imagebind"])
    ids, labels = data["ids"], data["labels"]
    starts = {m: torch.searchsorted(r, torch.arange(len(ids) + 1)) for m, r in data["rows"].items()}
    projectors = model.input_projectors
    log.write(stage="data", event="texts", n=len(ids), dropped=data["dropped"], vocab=len(tok), params=_params(lm),
              projector_params=_params(projectors), media={m: len(r) for m, r in data["rows"].items()},
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

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


# ============================================================================ 4. the config


def _generator_config(modality: Modality, directory: Path, settings: dict[str, Any]) -> GeneratorConfig:
    kind = {Modality.IMAGE: "stable-diffusion", Modality.AUDIO: "audioldm", Modality.VIDEO: "text-to-video"}[modality]
    return GeneratorConfig(type=kind, pretrained=str(directory), settings=dict(settings))


def build_toy_config(out: str | os.PathLike, cfg: ModelPhasesConfig | None = None) -> AnyModalConfig:
    """The anymodal config of the toy model: the trained LLM (``out/llm``, with its tokenizer), the
    trained ImageBind (``out/encoder/model.safetensors`` with its options; image, audio, video), an
    input projector per modality, and the generators of ``out/image-generator`` and
    ``out/audio-generator`` where those phases have run (output projector targets read from each
    generator's ``conditioning_shapes``). Paths are absolute."""
    import anymodal.generators  # noqa: F401  (registers the adapters)

    from ..registry import GENERATORS

    out = Path(out).resolve()
    cfg = cfg or ModelPhasesConfig()
    st = cfg.stages
    for need in ("llm", "encoder"):
        if not (out / need).is_dir():
            raise ValueError(f"no {need} in {out}; run train_{need} first")
    encoder = _encoder_config(out)
    inputs = {m: input_projector_config(st.projector_hidden) for m in encoder.modalities}
    pretrained = out / "llm" / INPUT_PROJECTORS / "config.json"
    if st.carry_input_projectors and pretrained.is_file():  # the shapes the llm phase trained them at
        inputs = {Modality.parse(m): InputProjectorConfig(**c) for m, c in json.loads(pretrained.read_text()).items()}
    generators: dict[Modality, GeneratorConfig] = {}
    outputs: dict[Modality, OutputProjectorConfig] = {}
    settings = {Modality.IMAGE: st.image_settings, Modality.AUDIO: st.audio_settings,
                Modality.VIDEO: st.video_settings}
    for m, name in ((Modality.IMAGE, "image-generator"), (Modality.AUDIO, "audio-generator"),
                    (Modality.VIDEO, "video-generator")):
        directory = out / name
        if not (directory / "model_index.json").is_file():
            continue
        g = _generator_config(m, directory, settings[m])
        shapes = GENERATORS.get(g.type).from_config(replace(g, lazy=True)).conditioning_shapes
        generators[m] = g
        outputs[m] = OutputProjectorConfig(type="transformer", targets={k: list(v) for k, v in shapes.items()},
                                           hidden_dim=st.projector_hidden, num_layers=st.output_layers,
                                           num_heads=4 if st.projector_hidden % 4 == 0 else 1)
    llm = LLMConfig(model=str(out / "llm"), tokenizer=str(out / "llm"), max_new_tokens=st.max_new_tokens)
    return AnyModalConfig(llm=llm, name="toyworld", encoders={"imagebind": encoder}, input_projectors=inputs,
                          output_projectors=outputs, generators=generators)


# ============================================================================ 5. the stages


def stage_training_config(stage: int, cfg: StagesPhase, progress: bool = True,
                          outputs: Sequence[Modality] | None = None) -> Any:
    """anymodal.training settings of ``stage``; ``outputs``: the generators the toy model has (the
    denoising loss covers those of ``cfg.denoise_modalities`` among them; None: all of them)."""
    from ..config import LoraConfig
    from ..training import TrainingConfig

    steps = (cfg.stage1_steps, cfg.stage2_steps, cfg.stage3_steps)[stage - 1]
    have = None if outputs is None else {Modality.parse(m).value for m in outputs}
    denoised = [m for m in cfg.denoise_modalities if have is None or m in have]
    denoise = cfg.stage2_denoise_weight if stage == 2 and denoised else 0.0
    return TrainingConfig(stage=stage, seed=cfg.seed, batch_size=cfg.batch_size, learning_rate=cfg.lr[stage - 1],
                          denoise_weight=denoise, denoise_modalities=denoised if denoise > 0 else None,
                          lr_scheduler="cosine", warmup_steps=min(cfg.warmup_steps, steps // 5), max_steps=steps,
                          max_bad_fraction=0.01, caption_prompt=CAPTION_PROMPT, generation_prompt=GENERATION_PROMPT,
                          generation_response=GENERATION_RESPONSE, save_every=cfg.save_every, keep_checkpoints=1,
                          log_every=1, progress=progress,
                          lora=LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                                          target_modules=list(cfg.lora_targets)))


def _pretrained_start(out: Path, config: AnyModalConfig, seed: int) -> Path:
    """``out/stages/stage0``: the toy pipeline with the llm phase's input projectors loaded (what
    stage 1 starts from; the LLM and encoder are referenced, the output projectors fresh)."""
    from safetensors.torch import load_model

    from ..pipeline import INDEX_NAME, AnyModalPipeline

    start = out / "stages" / "stage0"
    if not (start / INDEX_NAME).is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = AnyModalPipeline.from_config(config)
        for m, proj in pipe.model.input_projectors.items():
            load_model(proj, str(out / "llm" / INPUT_PROJECTORS / f"{m}.safetensors"))
        pipe.save_pretrained(start)
    return start


def run_stages(out: Path, cfg: ModelPhasesConfig, log: JsonlLog, control: RunControl) -> Path:
    """Run anymodal stages 1, 2 and 3 on the toy components and save ``out/final``.

    The manifests come from :func:`write_manifests` (``cfg.stages`` sizes), filtered to what the
    model reads and generates. Each stage runs in ``out/stages/stage<N>`` and resumes from its last
    checkpoint; a finished stage (its ``final/`` exists) is skipped. ``control``'s deadline stops a
    stage at its next checkpoint (raising :class:`~anymodal.toyworld.train.Stop`). Stage 1 starts from
    ``out/stages/stage0``, the pipeline with the llm phase's input projectors (unless
    ``carry_input_projectors`` is off or the llm phase saved none). Stage 3's LoRA is merged into the
    LLM, and the merged pipeline is saved to ``out/final``.
    """
    from ..training import merge_lora
    from ..training import train as train_stage

    out = Path(out)
    st = cfg.stages
    config = build_toy_config(out, cfg)
    data = write_manifests(out, st.n_captions, st.n_dialogues, st.seed)
    inputs, outputs = list(config.input_projectors), list(config.generators)
    if not outputs:
        raise ValueError(f"no generator in {out} (image-generator, audio-generator): run a generator phase first")
    manifests = {1: filter_manifest(data / "captions.jsonl", data / "stage1-captions.jsonl", inputs, [], "input"),
                 2: filter_manifest(data / "captions.jsonl", data / "stage2-captions.jsonl", [], outputs, "output"),
                 3: filter_manifest(data / "dialogues.jsonl", data / "stage3-dialogues.jsonl", inputs, outputs)}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    source = str(out / "stages" / "toy-config.yaml")  # anymodal.training reads a model from a file or directory
    config.to_yaml(source)
    if st.carry_input_projectors and (out / "llm" / INPUT_PROJECTORS / "config.json").is_file():
        source = str(_pretrained_start(out, config, st.seed))
    for stage in (1, 2, 3):
        run_dir = out / "stages" / f"stage{stage}"
        final = run_dir / "final"
        if not (final / "anymodal_index.json").is_file():
            tcfg = stage_training_config(stage, st, control.progress, outputs)

            def on_step(step: int, metrics: dict[str, float], every: int = st.save_every, total: int = tcfg.max_steps
                        ) -> None:
                if step % every == 0 and step < total and control.should_stop(step):
                    raise Stop(f"stage {stage}: stopped at step {step}/{total} (checkpointed); rerun to resume")

            t0 = time.time()
            # accelerate places the stage: on the CPU when asked, else on the current GPU (train() set it)
            result = train_stage(source, manifests[stage], run_dir, tcfg, resume=True, on_step=on_step,
                                 device="cpu" if torch.device(control.device).type == "cpu" else None)
            log.write(stage=f"stage{stage}", event="done", device=result.device, steps=result.steps, samples=result.samples,
                      last_loss=result.losses[-1] if result.losses else None, bad_rows=result.bad_rows,
                      samples_per_s=round(result.samples_per_s, 2), seconds=round(time.time() - t0, 1))
        source = str(final)
    merged = out / "stages" / "stage3" / "merged"
    if not (merged / "anymodal_index.json").is_file():
        atomic_dir(merged, lambda d: (shutil.rmtree(d), merge_lora(out / "stages" / "stage3" / "final", d)))
    from ..pipeline import AnyModalPipeline

    pipe = AnyModalPipeline.from_pretrained(merged)
    return pipe.save_pretrained(out / "final")


# ============================================================================ 6. ship


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def ship(out: str | os.PathLike, dest: str | os.PathLike | None = None, limit_bytes: int = SHIP_LIMIT_BYTES,
         dtype: torch.dtype = torch.float16) -> Path:
    """Save ``out/final`` with every component copied (``save_frozen=True``) into ``dest`` (default
    :func:`anymodal.pipeline.default_model_dir`, what ``AnyModalPipeline.from_pretrained()`` loads
    with no name).

    ``dtype`` is the storage type of the floating-point weights (``torch.float16`` halves the size;
    ``torch.float32`` keeps them as trained). Loading is unchanged: every loader casts to the
    component's configured dtype (float32 by default), so the pipeline runs in float32 either way.
    The copy is made beside ``dest`` and swapped in only when its total size is within
    ``limit_bytes`` (25 MB); otherwise ``ValueError`` names the size and ``dest`` is untouched.
    Paths of the run directory are not recorded: the index's config names the components' places
    inside ``dest``.
    """
    from ..pipeline import INDEX_NAME, AnyModalPipeline, default_model_dir

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    final = Path(out) / "final"
    if not (final / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{final} is not a saved pipeline; run the 'stages' phase first "
                                f"(anymodal toyworld train --out {out} --phase stages)")
    dest = Path(dest) if dest is not None else default_model_dir()
    pipe = AnyModalPipeline.from_pretrained(final)
    c = pipe.config
    c.llm.model, c.llm.tokenizer = "llm", "processor"
    for name, e in c.encoders.items():
        e.pretrained = f"encoders/{name}/model.safetensors"
    for m, g in c.generators.items():
        g.pretrained = f"generators/{m.value}"

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp)
        pipe.save_pretrained(tmp, save_frozen=True)
        if dtype != torch.float32:
            cast_weights(tmp, dtype)
        _forget_source_paths(tmp)
        size = _size(tmp)
        if size > limit_bytes:
            raise ValueError(f"the shipped model would be {size / 1e6:.2f} MB ({size} bytes), over the limit of "
                             f"{limit_bytes / 1e6:.2f} MB; nothing was written to {dest}")

    return atomic_dir(dest, write)


def _forget_source_paths(directory: Path) -> None:
    """Drop the ``_name_or_path`` that diffusers and transformers write into saved configs: in a
    shipped copy it would only record where the run lived on the machine that built it."""
    for path in directory.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def cast_weights(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every ``*.safetensors`` file under ``directory`` with its floating-point tensors stored
    as ``dtype`` (metadata kept). The Griffin-Lim vocoder's mel filterbank, a fixed analysis matrix
    rather than learned weights (131 kB), stays as it is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(Path(directory).rglob("*.safetensors")):
        if f.parent.name == "vocoder":
            continue
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, f)


__all__ = ["CAPTION_PROMPT", "EncoderPhase", "FIELDS", "GENERATION_PROMPT", "GENERATION_RESPONSE", "LLMPhase",
           "MODEL_PHASES", "ModelPhasesConfig", "StagesPhase", "build_toy_config", "dialogue_row", "evaluate_encoder",
           "evaluate_llm", "cast_weights", "filter_manifest", "linear_probe", "llm_tokenizer", "run_stages", "ship",
           "stage_training_config", "train_encoder", "train_llm", "write_manifests"]
