"""Analytic checkers for the toy world: they read what an image, a tone, a clip or an answer
shows, with no learned model, so that a generator is judged by something it did not write.

``read_image`` / ``read_audio`` / ``read_video`` measure; ``score_image`` / ``score_audio`` /
``score_video`` / ``score_text`` compare a measurement with a spec and return a dict of
booleans: ``found`` (there is one clean shape or one tone at all), ``<field>_ok`` for every
field the spec names (unnamed fields get no key, so a parsed prompt such as "a red circle" is
judged on colour and shape only; pass ``spec.with_defaults()`` to also demand the defaults),
and ``ok`` (all of them). ``degrade_image`` / ``degrade_audio`` / ``degrade_video`` imitate a
generator's blur, noise and phase smear, to show that the checkers tolerate them.

How they read
    image   The background is fitted on a 2-pixel border ring as a colour linear in the row
            (this covers plain and gradient backgrounds; a robust refit drops border pixels a
            shape touches). Pixels far from it, after a light smoothing, form the foreground;
            its largest connected component is the shape. Colour: nearest named colour to the
            median of the component's most saturated pixels. Shape, from the soft coverage
            (distance to the background scaled by the shape's contrast): coverage skewed
            towards the bottom rows (apex up) is a triangle; otherwise the coverage over the
            widest row times the tallest column separates cross (5/9), circle (pi/4) and
            square (1). Position from the box centre, size from the box side. ``found``
            needs one compact, single-coloured blob with few stray pixels; noise fails it.
    audio   Level from 10 ms frame RMS; the tone is the frames above 30% of the loud level, and
            its length names the duration. Pitch, on a Welch spectrum of the tone: the lowest
            strong peak in 200-1400 Hz of which the strongest peak is a harmonic (so square and
            sawtooth waves do not read an octave up, nor a smeared peak as its lower lobe),
            then the nearest note within a semitone. Waveform: harmonics 2..n below 4 kHz
            relative to the fundamental; none is a sine, odd only a square, odd and even a
            sawtooth. A tone must tower over the median of its spectrum, which noise does not.
    video   The shape is found in every frame; the least-squares slope of its centre over time
            gives the direction; colour and shape are majority votes over frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage, optimize, signal

from ..modality import Modality
from .world import (BACKGROUNDS, COLOURS, DURATIONS, NOTES, POSITION_OFFSET, SAMPLE_RATE,
                    SIZES, AudioSpec, ImageSpec, Spec, VideoSpec, _DURATION_PATTERNS, _field_words, _NOTE_RE,
                    _words, as_generator, note_register, parse_caption)

# ----------------------------------------------------------------------------- input handling


def _as_image(image: Any) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image or an array (uint8, or float in [0, 1])."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    if arr.shape[0] < 16 or arr.shape[1] < 16:
        raise ValueError(f"image is too small to read: {arr.shape[:2]} (need at least 16x16)")
    out = arr.astype(np.float64)
    if arr.dtype.kind == "f" and np.nanmax(out) <= 1.5:  # floats in [0, 1] (a diffusion decode)
        out = out * 255.0
    return np.clip(np.nan_to_num(out), 0.0, 255.0)


def _as_video(video: Any) -> np.ndarray:
    """(T, H, W, 3) float64 from a (T, H, W, 3) array or a list of frames."""
    if isinstance(video, np.ndarray) and video.ndim != 4:
        raise ValueError(f"expected a video of shape (T, H, W, 3), got shape {video.shape}")
    frames = [_as_image(f) for f in video]
    if len(frames) < 2:
        raise ValueError(f"a video needs at least 2 frames, got {len(frames)}")
    return np.stack(frames)


def _as_audio(wave: Any, sample_rate: int) -> np.ndarray:
    arr = np.asarray(wave, dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"expected mono audio of shape (samples,), got shape {arr.shape}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate < 8000:
        raise ValueError(f"sample_rate must be an int >= 8000, got {sample_rate!r}")
    if len(arr) < sample_rate // 10:
        raise ValueError(f"audio is too short to read: {len(arr)} samples (need at least 0.1 s)")
    return np.nan_to_num(arr)


# ----------------------------------------------------------------------------- images

_BORDER = 2  # px of border ring that shows the background
_MIN_CONTRAST = 45.0  # a foreground pixel is at least this far (RGB) from the background
_SMOOTH_SIGMA = 0.8  # px; averages away pixel noise before thresholding


@dataclass
class ImageReading:
    """What :func:`read_image` saw. Names are None when no shape was found."""

    found: bool
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    rgb: tuple[float, float, float] | None = None  # median colour of the shape's core
    fill: float = 0.0  # coverage / (widest row x tallest column); circle pi/4, square 1, cross 5/9
    skew: float = 0.0  # skewness of the coverage over rows; an apex-up triangle's is -0.57
    side: float = 0.0  # bounding-box side / image side
    centre: tuple[float, float] = (0.0, 0.0)  # box centre (x, y) relative to the image centre, in sides


def _fit_background(img: np.ndarray) -> np.ndarray:
    """Per-row background colour (H, 3), linear in the row, fitted robustly on the border ring."""
    h, w = img.shape[:2]
    ring = np.zeros((h, w), dtype=bool)
    ring[:_BORDER] = ring[-_BORDER:] = True
    ring[:, :_BORDER] = ring[:, -_BORDER:] = True
    rows = np.nonzero(ring)[0]
    cols = img[ring]
    u = rows / (h - 1) - 0.5
    x = np.stack([np.ones_like(u), u], axis=1)
    # Start from the pixels near the border's median colour, so a shape that touches the
    # border cannot drag the first fit, then refit on the inliers.
    keep = np.linalg.norm(cols - np.median(cols, axis=0), axis=1) < 80.0
    if keep.sum() < 8:
        keep[:] = True
    for _ in range(3):
        coef = np.linalg.lstsq(x[keep], cols[keep], rcond=None)[0]
        resid = np.linalg.norm(cols - x @ coef, axis=1)
        new_keep = resid < max(30.0, 3.0 * float(np.median(resid[keep])))
        if new_keep.sum() < 8:
            break
        keep = new_keep
    uu = np.arange(h) / (h - 1) - 0.5
    return coef[0][None, :] + uu[:, None] * coef[1][None, :]


def _nearest(rgb: np.ndarray, table: dict[str, Any]) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(rgb - np.asarray(table[k], dtype=np.float64))))


def _classify_background(bg_rows: np.ndarray) -> str:
    top, bottom = bg_rows[0], bg_rows[-1]
    return min(BACKGROUNDS, key=lambda k: float(np.linalg.norm(top - BACKGROUNDS[k][0])
                                                  + np.linalg.norm(bottom - BACKGROUNDS[k][1])))


def _classify_shape(fill: float, skew: float) -> str:
    # Midpoints between the clean values (circle pi/4, square 1, cross 5/9 fill; triangle skew
    # -0.57, others 0), checked on renders blurred with sigma 1-1.5 px plus noise, at 14-30 px.
    if skew < -0.25:
        return "triangle"
    if fill < 0.76:
        return "cross"
    return "square" if fill > 0.92 else "circle"


def _classify_position(cx: float, cy: float) -> str:
    if max(abs(cx), abs(cy)) < POSITION_OFFSET / 2:
        return "center"
    if abs(cx) >= abs(cy):
        return "left" if cx < 0 else "right"
    return "top" if cy < 0 else "bottom"


def _classify_size(side: float) -> str:
    names = list(SIZES)
    values = np.array([SIZES[n] for n in names])
    return names[int(np.argmin(np.abs(np.log(side) - np.log(values))))]


def _read_image_array(img: np.ndarray) -> ImageReading:
    h, w = img.shape[:2]
    bg_rows = _fit_background(img)
    background = _classify_background(bg_rows)
    smooth = ndimage.gaussian_filter(img, sigma=(_SMOOTH_SIGMA, _SMOOTH_SIGMA, 0))
    dist = np.linalg.norm(smooth - bg_rows[:, None, :], axis=2)
    # Half of the shape's own contrast: on the original edge for a blurred shape, and far above
    # the noise for every colour/background pair of the world (all >= 124 apart).
    thr = max(_MIN_CONTRAST, 0.5 * float(np.percentile(dist, 99.5)))
    mask = ndimage.binary_fill_holes(dist > thr)
    labels, n = ndimage.label(mask)
    if n == 0:
        return ImageReading(False, background=background)
    areas = np.bincount(labels.ravel())[1:]
    comp = labels == (int(np.argmax(areas)) + 1)
    area = int(areas.max())
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    # The most saturated pixels of the shape: edges mix with the background after blur.
    d_comp = dist[comp]
    core = comp & (dist >= 0.8 * float(np.percentile(d_comp, 95)))
    core_rgb = smooth[core]  # smoothed: pixel noise would hide how uniform the colour is
    rgb = np.median(core_rgb, axis=0)
    spread = float(np.median(np.linalg.norm(core_rgb - rgb, axis=1)))
    # One clean, compact, single-coloured blob, or nothing: random noise fails these.
    found = (area >= max(12, 0.004 * h * w) and max(bh, bw) <= 0.8 * min(h, w) and spread <= 35.0
             and mask.sum() - area <= 0.5 * area)
    reading = ImageReading(found, background=background, rgb=tuple(float(v) for v in rgb))
    # Shape from soft coverage rather than the thresholded mask: blur moves coverage across an
    # edge but keeps its sum, so row and column sums of coverage hardly change under blur.
    near = ndimage.binary_dilation(comp, iterations=3)
    floor = float(np.percentile(dist[~near], 90)) if (~near).any() else 0.0  # the noise level
    contrast = float(np.percentile(d_comp, 98))
    alpha = np.clip((dist - floor) / max(contrast - floor, 1e-6), 0.0, 1.0) * near
    rows, cols = alpha.sum(axis=1), alpha.sum(axis=0)
    total = float(rows.sum())
    reading.fill = total / max(float(rows.max() * cols.max()), 1e-6)
    y = np.arange(h) + 0.5
    mean_y = float((rows * y).sum()) / total
    var_y = float((rows * (y - mean_y) ** 2).sum()) / total
    reading.skew = float((rows * (y - mean_y) ** 3).sum()) / total / max(var_y, 1e-6) ** 1.5
    reading.side = max(bh, bw) / float(min(h, w))
    reading.centre = (((x0 + x1) / 2.0 - w / 2.0) / w, ((y0 + y1) / 2.0 - h / 2.0) / h)
    if found:
        reading.colour = _nearest(rgb, COLOURS)
        reading.shape = _classify_shape(reading.fill, reading.skew)
        reading.size = _classify_size(reading.side)
        reading.position = _classify_position(*reading.centre)
    return reading


def read_image(image: Any) -> ImageReading:
    """Measure colour, shape, size, position and background of an RGB image (array or PIL).

    Arrays are (H, W, 3), uint8 in 0..255 or float in [0, 1].
    """
    return _read_image_array(_as_image(image))


def _score(reading: Any, spec: Spec, names: Sequence[str]) -> dict[str, bool]:
    out = {"found": bool(reading.found)}
    for name in names:
        want = getattr(spec, name)
        if want is not None:
            out[f"{name}_ok"] = bool(reading.found) and getattr(reading, name) == want
    out["ok"] = all(out.values())
    return out


def score_image(image: Any, spec: ImageSpec) -> dict[str, bool]:
    """``found``, ``<field>_ok`` for each field ``spec`` names, and ``ok`` (all true)."""
    if not isinstance(spec, ImageSpec):
        raise ValueError(f"score_image needs an ImageSpec, got {type(spec).__name__}")
    return _score(read_image(image), spec, ("colour", "shape", "size", "position", "background"))


# ----------------------------------------------------------------------------- audio

_FRAME_S = 0.01
_ACTIVE = 0.3  # a frame belongs to the tone above 30% of the loud level (noise at 20 dB SNR is ~10%)
_F0_BAND = (200.0, 1400.0)  # around C4..C6
_HARMONIC_BAND = 4000.0  # harmonics above this are smeared by a 64-mel front end
_NOTE_TOLERANCE_CENTS = 100.0
_MAX_CLIPPED = 0.01  # 1% of samples on flat tops is a clipped file (clean tones: 0; clipped ones: 50-90%)
_SINE_CREST = (1.25, 3.2)


@dataclass
class AudioReading:
    """What :func:`read_audio` saw. ``note`` is None when the pitch is over a semitone off the world's notes."""

    found: bool
    note: str | None = None
    waveform: str | None = None
    duration: str | None = None
    register: str | None = None
    f0: float | None = None  # Hz
    cents: float | None = None  # from the nearest note
    seconds: float = 0.0  # how long the tone is loud
    even: float = 0.0  # RMS of even harmonics / fundamental
    odd: float = 0.0  # RMS of odd harmonics from the 3rd / fundamental
    tonality: float = 0.0  # fundamental peak / median spectrum level
    crest: float = 0.0  # peak / RMS of the loud part: sqrt(2) for a clean sine, 1 for a square or a clipped tone
    clipped: float = 0.0  # fraction of the loud part's samples on a flat top at the peak (a clipped file)

    @property
    def clean(self) -> bool:
        """No sign of clipping, and for a sine a sine's crest factor: a hard-clipped sine reads as a
        square (crest ~1, flat tops), which the waveform field alone misses once it is saved as
        PCM and compared only by pitch. Griffin-Lim's phase smear lifts a clean sine's crest to
        about 1.6-2.1 on the world's real mels and to 2.6-2.9 on generated ones (measured), so the bound is loose above."""
        if self.clipped > _MAX_CLIPPED:
            return False
        return self.waveform != "sine" or _SINE_CREST[0] <= self.crest <= _SINE_CREST[1]


def _nearest_note(f0: float) -> tuple[str, float]:
    cents = {n: 1200.0 * np.log2(f0 / hz) for n, hz in NOTES.items()}
    name = min(cents, key=lambda n: abs(cents[n]))
    return name, float(cents[name])


def _peak_near(freqs: np.ndarray, mag: np.ndarray, f: float, rel: float = 0.04) -> float:
    band = (freqs >= f * (1 - rel)) & (freqs <= f * (1 + rel))
    return float(mag[band].max()) if band.any() else 0.0


def read_audio(wave: Any, sample_rate: int = SAMPLE_RATE) -> AudioReading:
    """Measure pitch, waveform and duration of a mono tone (float samples, any scale)."""
    x = _as_audio(wave, sample_rate)
    hop = max(1, int(round(_FRAME_S * sample_rate)))
    n_frames = len(x) // hop
    rms = np.sqrt(np.mean(x[: n_frames * hop].reshape(n_frames, hop) ** 2, axis=1))
    level = float(np.percentile(rms, 95))
    if level < 1e-4:
        return AudioReading(False)
    active = rms > _ACTIVE * level
    seconds = float(active.sum()) * hop / sample_rate
    idx = np.nonzero(active)[0]
    seg = x[idx[0] * hop: (idx[-1] + 1) * hop]
    # Welch's average over 0.25 s windows: a phase-smeared (vocoded) tone has a ragged
    # single-window spectrum whose side lobes would pass for peaks.
    nperseg = min(len(seg), 4096)
    freqs, psd = signal.welch(seg, fs=sample_rate, window="hann", nperseg=nperseg, nfft=8 * 4096)
    mag = np.sqrt(psd)
    in_band = (freqs >= _F0_BAND[0]) & (freqs <= _F0_BAND[1])
    wide = (freqs >= 100.0) & (freqs <= min(7000.0, 0.45 * sample_rate))
    k_top = int(np.argmax(np.where(wide, mag, 0.0)))
    top = float(mag[k_top])
    peaks, _ = signal.find_peaks(np.where(in_band, mag, 0.0), height=0.2 * top)
    duration = min(DURATIONS, key=lambda d: abs(DURATIONS[d] - seconds))
    # The fundamental is the lowest strong peak of which the strongest peak is a harmonic, so
    # square and sawtooth waves do not read an octave up, and a peak split by phase smear
    # (two lobes a tone apart) does not read as the lower lobe.
    ratios = freqs[k_top] / freqs[peaks] if len(peaks) else np.zeros(0)
    harmonic = np.abs(ratios / np.maximum(np.round(ratios), 1.0) - 1.0) < 0.03
    if not harmonic.any():
        return AudioReading(False, duration=duration, seconds=seconds)
    k = int(peaks[np.nonzero(harmonic)[0][0]])
    a, b, c = np.log(mag[k - 1: k + 2] + 1e-12)
    offset = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0  # parabolic refinement
    f0 = float(freqs[k] + offset * (freqs[1] - freqs[0]))
    a1 = float(mag[k])
    tonality = a1 / max(float(np.median(mag[wide])), 1e-12)
    harm = {h: _peak_near(freqs, mag, h * f0) / a1 for h in range(2, int(_HARMONIC_BAND // f0) + 1)}
    even = float(np.sqrt(sum(v * v for h, v in harm.items() if h % 2 == 0)))
    odd = float(np.sqrt(sum(v * v for h, v in harm.items() if h % 2 == 1)))
    if max(even, odd) < 0.12:
        waveform = "sine"
    else:
        waveform = "square" if even < 0.5 * odd else "sawtooth"
    note, cents = _nearest_note(f0)
    if abs(cents) > _NOTE_TOLERANCE_CENTS:
        note = None
    # A tone towers over its spectrum's median; noise does not (a Rayleigh peak is ~4x median).
    found = tonality > 20.0
    peak = float(np.abs(seg).max())
    crest = peak / max(float(np.sqrt(np.mean(seg ** 2))), 1e-12)
    at_peak = np.abs(seg) >= 0.999 * peak
    # flat tops: neighbouring samples both at the peak and equal (a band-limited tone, even a square
    # wave with its ripple, has almost none; a clipped one has them on every cycle)
    clipped = float(np.mean(at_peak[1:] & at_peak[:-1] & (np.abs(np.diff(seg)) <= 1e-4 * peak))) if len(seg) > 1 else 0.0
    return AudioReading(found, note if found else None, waveform if found else None, duration,
                        note_register(note) if (found and note) else None, f0, cents, seconds, even, odd, tonality,
                        crest, clipped)


def score_audio(wave: Any, sample_rate: int, spec: AudioSpec) -> dict[str, bool]:
    """``found``, ``<field>_ok`` for each field ``spec`` names (note, waveform, duration, register),
    ``clean_ok`` (not clipped; a sine with a sine's crest factor, :attr:`AudioReading.clean`) and ``ok``."""
    if not isinstance(spec, AudioSpec):
        raise ValueError(f"score_audio needs an AudioSpec, got {type(spec).__name__}")
    reading = read_audio(wave, sample_rate)
    out = _score(reading, spec, ("note", "waveform", "duration", "register"))
    out["clean_ok"] = bool(reading.found) and reading.clean
    out["ok"] = out["ok"] and out["clean_ok"]
    return out


# ----------------------------------------------------------------------------- video


@dataclass
class VideoReading:
    """What :func:`read_video` saw: majority colour and shape, and the direction of motion."""

    found: bool
    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    motion: tuple[float, float] = (0.0, 0.0)  # fitted displacement (x, y) over the clip, in frame sides
    frames_found: int = 0


def _vote(values: list[str | None]) -> str | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    names, counts = np.unique(vals, return_counts=True)
    return str(names[int(np.argmax(counts))])


def read_video(video: Any) -> VideoReading:
    """Read a clip given as (T, H, W, 3) array or a list of frames (arrays or PIL images)."""
    frames = _as_video(video)
    readings = [_read_image_array(f) for f in frames]
    t = np.array([i for i, r in enumerate(readings) if r.found], dtype=np.float64)
    n_found = len(t)
    if n_found < max(2, len(frames) // 2):
        return VideoReading(False, frames_found=n_found)
    cx = np.array([readings[int(i)].centre[0] for i in t])
    cy = np.array([readings[int(i)].centre[1] for i in t])
    span = len(frames) - 1
    dx = float(np.polyfit(t, cx, 1)[0]) * span
    dy = float(np.polyfit(t, cy, 1)[0]) * span
    direction = None
    if max(abs(dx), abs(dy)) >= 0.1:  # a tenth of the frame; the world's shapes travel 0.4
        direction = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("up" if dy < 0 else "down")
    return VideoReading(True, _vote([r.colour for r in readings]), _vote([r.shape for r in readings]),
                        direction, (dx, dy), n_found)


def score_video(video: Any, spec: VideoSpec) -> dict[str, bool]:
    """``found``, ``<field>_ok`` for each field ``spec`` names (colour, shape, direction), ``ok``."""
    if not isinstance(spec, VideoSpec):
        raise ValueError(f"score_video needs a VideoSpec, got {type(spec).__name__}")
    return _score(read_video(video), spec, ("colour", "shape", "direction"))


# ----------------------------------------------------------------------------- text answers

_QUESTION_FIELDS: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("colour", "shape", "size", "position", "background"),
    Modality.AUDIO: ("note", "waveform", "duration", "register"),
    Modality.VIDEO: ("colour", "shape", "direction"),
}
QUESTION_KINDS: tuple[str, ...] = ("caption", "colour", "shape", "size", "position", "background", "note",
                                   "waveform", "duration", "register", "direction")


def _check_question(question_kind: str, spec: Spec) -> None:
    if not isinstance(spec, (ImageSpec, AudioSpec, VideoSpec)):
        raise ValueError(f"expected a toy-world spec, got {type(spec).__name__}")
    allowed = ("caption",) + _QUESTION_FIELDS[spec.modality]
    if question_kind not in allowed:
        raise ValueError(f"unknown question kind {question_kind!r} for {spec.modality.value}; "
                         f"expected one of: {', '.join(allowed)}")
    if question_kind == "caption":
        if not spec.is_complete:
            raise ValueError(f"a caption answer is checked against a complete spec, got {spec}")
    elif getattr(spec, question_kind) is None:
        raise ValueError(f"the spec does not name its {question_kind}: {spec}")


def read_answer(question_kind: str, answer: str, modality: Modality | str) -> Any:
    """The value an answer gives for one field (or the spec it describes, for "caption"); None if unclear.

    An answer may be a bare value ("red", "A5", "on the left", "half a second") or a caption.
    """
    m = Modality.parse(modality)
    parsed = parse_caption(answer)
    if parsed is not None and parsed.modality is not m:
        parsed = None
    if isinstance(parsed, ImageSpec):
        parsed = parsed.with_defaults()  # the grammar leaves medium / center / black unsaid
    if question_kind == "caption":
        return parsed
    if parsed is not None and getattr(parsed, question_kind, None) is not None:
        return getattr(parsed, question_kind)
    text = " ".join(_words(answer))
    for pattern, token in _DURATION_PATTERNS:
        text = pattern.sub(token, text)
    words = text.split()
    if question_kind == "background":
        table = {b: b for b in BACKGROUNDS}
    elif question_kind == "note":
        table = {w: w[0].upper() + w[1:] for w in words if _NOTE_RE.match(w)}
    else:
        table = _field_words(m).get(question_kind, {})
    values = {table[w] for w in words if w in table}
    return values.pop() if len(values) == 1 else None


def check_answer(question_kind: str, answer: str, spec: Spec) -> bool:
    """True if a text answer is right about ``spec`` (the truth).

    ``question_kind`` is a field of the spec's modality (colour, shape, size, position,
    background; note, waveform, duration, register; direction) or ``"caption"``, which asks for
    the whole description: an image caption may leave the defaults unsaid, an audio caption
    must name note, waveform and duration.
    """
    return score_text(question_kind, answer, spec)["ok"]


def score_text(question_kind: str, answer: str, spec: Spec) -> dict[str, bool]:
    """``ok``, plus ``<field>_ok`` for every field of ``spec`` when the question is "caption"."""
    _check_question(question_kind, spec)
    got = read_answer(question_kind, answer, spec.modality)
    if question_kind != "caption":
        return {"ok": got is not None and got == getattr(spec, question_kind)}
    out = {f"{n}_ok": got is not None and getattr(got, n) == getattr(spec, n) for n in spec.field_names()}
    out["ok"] = all(out.values())
    return out


# ----------------------------------------------------------------------------- degradations


def degrade_image(image: np.ndarray, rng: int | np.random.Generator, blur_sigma: float = 1.25,
                  noise_std: float = 15.0) -> np.ndarray:
    """Gaussian blur (sigma in px) then Gaussian noise (std in 0..255 units): a rough diffusion output."""
    g = as_generator(rng)
    img = _as_image(image)
    if blur_sigma > 0:
        img = ndimage.gaussian_filter(img, sigma=(blur_sigma, blur_sigma, 0))
    img = img + g.normal(0.0, noise_std, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def degrade_video(video: np.ndarray, rng: int | np.random.Generator, blur_sigma: float = 1.0,
                  noise_std: float = 15.0) -> np.ndarray:
    """:func:`degrade_image` on every frame."""
    g = as_generator(rng)
    return np.stack([degrade_image(f, g, blur_sigma, noise_std) for f in _as_video(video)])


def degrade_audio(wave: np.ndarray, rng: int | np.random.Generator, snr_db: float | None = 20.0,
                  griffin_lim: bool = False, n_mels: int | None = 64, n_iter: int = 32,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Imitate a spectrogram generator: optional mel + Griffin-Lim resynthesis, then white noise.

    With ``griffin_lim`` the magnitude STFT (n_fft 1024, hop 256) is taken, optionally squeezed
    through ``n_mels`` HTK mel bands and back (non-negative least squares, about 0.2 s a
    clip), and the phase is rebuilt from random
    by ``n_iter`` Griffin-Lim iterations. ``snr_db`` is signal power over noise power for the
    whole clip (None: no noise).
    """
    g = as_generator(rng)
    x = _as_audio(wave, sample_rate)
    n = len(x)
    if griffin_lim:
        kw = dict(fs=sample_rate, window="hann", nperseg=1024, noverlap=1024 - 256, boundary="even")
        mag = np.abs(signal.stft(x, **kw)[2])
        if n_mels:
            from ..generators.vocoders import mel_filterbank  # imports diffusers: only when needed

            fb = mel_filterbank(n_mels, 1024, sample_rate)
            mel = fb @ mag ** 2
            scale = max(float(mel.max()), 1e-12)  # nnls' tolerances are absolute
            # Non-negative least squares per frame: a plain pseudo-inverse moves low peaks by
            # up to a tone, which is the inversion's fault, not the generator's.
            power = np.stack([optimize.nnls(fb, mel[:, j] / scale)[0] for j in range(mel.shape[1])], axis=1)
            mag = np.sqrt(power * scale)
        phase = np.exp(2j * np.pi * g.random(mag.shape))
        for _ in range(n_iter):
            y = signal.istft(mag * phase, **{k: v for k, v in kw.items() if k != "boundary"})[1][:n]
            y = np.pad(y, (0, max(0, n - len(y))))
            spec = signal.stft(y, **kw)[2]
            phase = np.exp(1j * np.angle(spec))
        x = signal.istft(mag * phase, **{k: v for k, v in kw.items() if k != "boundary"})[1][:n]
        x = np.pad(x, (0, max(0, n - len(x))))
    if snr_db is not None:
        power = float(np.mean(x ** 2))
        x = x + g.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10.0)), size=n)
    return x.astype(np.float32)


__all__ = [
    "AudioReading", "ImageReading", "QUESTION_KINDS", "VideoReading", "check_answer", "degrade_audio",
    "degrade_image", "degrade_video", "read_answer", "read_audio", "read_image", "read_video", "score_audio",
    "score_image", "score_text", "score_video",
]
