"""The ``encoder`` phase: a tiny ImageBind (anymodal's own, image, audio and video) for the world.

It trains with one linear classifier per world field on its pooled embedding, on renders of the
train split plus renders changed off the world (colours off the palette and shapes outside the
world, pitches off the note grid and other timbres), so that colour is read apart from shape and
pitch apart from timbre, which held-out combinations need. Saved with
``ImageBindEncoder.save_pretrained`` to ``out/encoder``; linear probes on held-out pairs score it.
"""

from __future__ import annotations

import colorsys
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modality import Modality
from ..utils import atomic_write_text
from . import world
from .loop import (JsonlLog, RunControl, atomic_dir, atomic_save, check_same_config, cosine_lr, count_params, device_of,
                   optimizer_step, train_loop)
from .recipe import EncoderPhase


_IMAGE_FIELDS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "size": tuple(world.SIZES),
                 "position": tuple(world.POSITIONS), "background": tuple(world.BACKGROUNDS)}
_AUDIO_FIELDS = {"note": tuple(world.NOTES), "waveform": world.WAVEFORMS, "duration": tuple(world.DURATIONS)}
_VIDEO_FIELDS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "direction": tuple(world.DIRECTIONS)}
FIELDS: dict[Modality, dict[str, tuple[str, ...]]] = {Modality.IMAGE: _IMAGE_FIELDS, Modality.AUDIO: _AUDIO_FIELDS,
                                                      Modality.VIDEO: _VIDEO_FIELDS}


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
              params={"encoder": count_params(enc), "heads": count_params(heads)})

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
        return optimizer_step(opt, loss, params)

    train_loop(stage="encoder", total=cfg.steps, ckpt=state_dir / "encoder.ckpt",
               modules={"encoder": enc, "heads": heads}, optimizer=opt, gen=gen, ema=None, step_fn=step,
               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps), log=log,
               checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control)
    enc.eval()
    figures = evaluate_encoder(enc, heads, cfg)
    log.write(stage="encoder", step=cfg.steps, event="eval", **figures)
    atomic_write_text(state_dir / "figures.json", json.dumps(figures, indent=2) + "\n")
    return atomic_dir(out / "encoder", enc.save_pretrained)
