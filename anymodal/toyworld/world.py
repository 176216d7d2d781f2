"""The toy world: a seeded generator of paired captions, images, audio, video and dialogues.

anymodal's tiny default model is trained on this world, and its outputs are judged by the
analytic checkers in :mod:`anymodal.toyworld.checkers`. Everything here is pure numpy and
deterministic: every sampler takes a seed or a ``numpy.random.Generator``.

Vocabulary (all of it is data, below)
    images  colour (``COLOURS``) x shape (``SHAPES``) x size (``SIZES``) x position
            (``POSITIONS``) x background (``BACKGROUNDS``); 64x64 RGB uint8 by default. The
            foreground never has the background's colour, and every allowed pair is far apart
            in RGB, so a checker can always separate them.
    audio   note (``NOTES``: C pentatonic from C4 to C6, 11 pitches, so neighbours are 2-3
            semitones apart) x waveform (``WAVEFORMS``: band-limited sine, square, sawtooth) x
            duration (``DURATIONS``: 0.5 s or 1.0 s), in a clip of ``CLIP_SAMPLES`` samples at
            ``SAMPLE_RATE`` (16384 samples = 64 hops of 256 at 16 kHz). The register
            (``low``: octave 4, ``high``: octaves 5-6) follows from the note.
    video   colour x shape x direction (``DIRECTIONS``): ``VIDEO_FRAMES`` frames of
            ``VIDEO_SIZE`` x ``VIDEO_SIZE``, one shape crossing a black frame.

Caption grammar (``spec.caption()``; :func:`parse_caption` is its inverse)
    image   ``a|an [small|large] <colour> <shape> [on the left|on the right|at the top|
            at the bottom] [on a <background> background]``. A medium size, the center and a
            black background are the defaults and are left unsaid, so ``"a red circle"`` is a
            medium red circle in the middle of a black image.
    audio   ``a <low|high> <waveform> tone of <note> lasting <half a second|one second>``,
            e.g. ``"a high sine tone of A5 lasting half a second"``.
    video   ``a|an <colour> <shape> moving <left|right|up|down>``.

    :func:`parse_caption` also reads prompts and answers built from the same words
    (``"draw a red circle"``, ``"play a low square tone"``): it ignores instruction words
    (draw, play, make, show, ...), leaves unnamed fields ``None`` (for images, call
    ``spec.with_defaults()`` to read them as the grammar's defaults), and returns ``None`` for
    anything outside the world (unknown words, a note such as ``C#4``, two colours for one
    shape, a shape on a background of its own colour).

Held-out combinations (``HELD_OUT``)
    colour x shape pairs for images (and videos), note x waveform pairs for audio, and colour
    x direction pairs for video. ``split="train"`` never produces a spec holding one of them;
    ``split="heldout"`` produces only such specs, so evaluation can test composition.

Dialogues (:func:`sample_dialogue`)
    A :class:`Dialogue` is ``task`` plus ``turns``: a list of ``{"role": "user"|"assistant",
    "content": [part, ...]}``. A part is ``{"type": "text", "text": str}`` or a media part
    ``{"type": "image"|"audio"|"video", "spec": <spec>}`` that, when rendered, also holds the
    array under its type's key (``"image"``: (H, W, 3) uint8; ``"audio"``: (samples,) float32
    plus ``"sample_rate"``; ``"video"``: (T, H, W, 3) uint8). In a user turn the media part
    comes before the text. An assistant turn that makes media says the full caption first,
    then holds the media part. Tasks (``TASKS``): ``t2i``, ``t2a``, ``t2v`` (make media from a
    prompt), ``i2t``, ``a2t``, ``v2t`` (answer a question about media; ``Dialogue.question``
    names the asked field, or ``"caption"``), ``i2i`` (edit a given image), and ``edit_image``,
    ``edit_audio``, ``edit_video`` (make media, then change it on request: "make it blue",
    "now make it sound higher"; :func:`apply_edit` is the edit grammar).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping, Sequence, TypedDict, Union

import numpy as np

from ..modality import Modality

RGB = tuple[int, int, int]

# ----------------------------------------------------------------------------- vocabulary

# Foreground colours. Chosen so that every pair is >= 90 apart in RGB (orange-yellow is the
# closest) and every foreground is >= 130 from every background it may appear on.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 225, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "purple": (180, 40, 220),
    "white": (240, 240, 240),
}

# Backgrounds as (top colour, bottom colour); a plain one has both equal. The gradient runs
# vertically, so a checker can model any background as linear in the row index.
BACKGROUNDS: dict[str, tuple[RGB, RGB]] = {
    "black": ((0, 0, 0), (0, 0, 0)),
    "white": ((245, 245, 245), (245, 245, 245)),
    "blue": (COLOURS["blue"], COLOURS["blue"]),
    "green": (COLOURS["green"], COLOURS["green"]),
    "gradient": ((0, 0, 0), (64, 64, 64)),
}

# Kept to four silhouettes that differ in simple mask statistics: the fill of the bounding
# box (circle pi/4, square 1, triangle 1/2, cross 5/9) and solidity (the cross is concave).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Side of the shape's bounding box as a fraction of the image side (14, 22, 30 px at 64 px).
SIZES: dict[str, float] = {"small": 14 / 64, "medium": 22 / 64, "large": 30 / 64}

# Unit offsets of the shape's centre; scaled by POSITION_OFFSET (13 px at 64 px), which keeps
# a large shape >= 4 px off the border so the border still shows the background.
POSITIONS: dict[str, tuple[int, int]] = {"center": (0, 0), "left": (-1, 0), "right": (1, 0),
                                         "top": (0, -1), "bottom": (0, 1)}
POSITION_OFFSET = 13 / 64

IMAGE_SIZE = 64
IMAGE_DEFAULTS: dict[str, str] = {"size": "medium", "position": "center", "background": "black"}
# Render jitter (only when a Generator is passed): centre shift in pixels at 64 px, relative size.
_POSITION_JITTER = 2 / 64
_SIZE_JITTER = 0.05

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16384  # 1.024 s: 64 hops of 256, the mel front end's frame grid


def _note_hz(midi: int) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


# C major pentatonic: no sharps to spell, and 2-3 semitones between neighbours, so a note
# survives a vocoder's or a tiny generator's pitch smear of a semitone.
_NOTE_MIDI = {"C4": 60, "D4": 62, "E4": 64, "G4": 67, "A4": 69, "C5": 72, "D5": 74, "E5": 76,
              "G5": 79, "A5": 81, "C6": 84}
NOTES: dict[str, float] = {name: _note_hz(m) for name, m in _NOTE_MIDI.items()}  # ascending
REGISTERS: dict[str, tuple[str, ...]] = {
    "low": tuple(n for n in NOTES if n.endswith("4")),
    "high": tuple(n for n in NOTES if not n.endswith("4")),
}
WAVEFORMS: tuple[str, ...] = ("sine", "square", "sawtooth")
DURATIONS: dict[str, float] = {"short": 0.5, "long": 1.0}  # seconds of tone; the rest is silence
DURATION_PHRASES: dict[str, str] = {"short": "half a second", "long": "one second"}
_HARMONIC_LIMIT_HZ = 6000.0  # band limit: no aliasing, and what a 64-mel front end still resolves
_ATTACK_S, _RELEASE_S = 0.01, 0.03  # raised-cosine ramps, so onsets do not click

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_FRAMES = 8
VIDEO_SIZE = 32
VIDEO_OBJECT_SIZE = 0.4  # side of the moving shape / frame side
VIDEO_TRAVEL = 0.2  # the centre moves from -0.2 to +0.2 of the frame side along the direction
_VIDEO_JITTER = 0.08  # sideways offset (and start shift) of the path, fraction of the side

SPLITS = ("train", "heldout")

# ----------------------------------------------------------------------------- held out


@dataclass(frozen=True)
class HeldOut:
    """Combinations that the training split never produces.

    ``image`` holds (colour, shape) pairs (also kept out of training videos, so that a video
    cannot leak an image composition), ``audio`` (note, waveform) pairs and ``video`` (colour,
    direction) pairs.
    """

    image: frozenset[tuple[str, str]]
    audio: frozenset[tuple[str, str]]
    video: frozenset[tuple[str, str]]


# Every held-out colour, shape, note, waveform and direction still appears in training with
# other partners; the demo prompt "a red circle on a blue background" stays in training.
HELD_OUT = HeldOut(
    image=frozenset({("blue", "triangle"), ("green", "circle"), ("yellow", "square"), ("purple", "cross")}),
    audio=frozenset({("E4", "sawtooth"), ("G5", "square")}),
    video=frozenset({("red", "up"), ("blue", "left"), ("white", "down")}),
)

# ----------------------------------------------------------------------------- specs


def _check_choice(name: str, value: str | None, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(allowed)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _SpecBase:
    """Shared behaviour of the three spec dataclasses; ``None`` in a field means unspecified."""

    modality: ClassVar[Modality]

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))  # type: ignore[arg-type]

    @property
    def is_complete(self) -> bool:
        """True when every field is set, i.e. the spec can be rendered."""
        return all(getattr(self, n) is not None for n in self.field_names())

    def matches(self, other: "Spec") -> bool:
        """True if ``other`` is of the same modality and agrees on every field set here."""
        return (type(other) is type(self)
                and all(getattr(self, n) is None or getattr(self, n) == getattr(other, n)
                        for n in self.field_names()))

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality.value, **asdict(self)}  # type: ignore[call-overload]

    def _require_complete(self) -> None:
        missing = [n for n in self.field_names() if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs every field to be rendered; missing: "
                             f"{', '.join(missing)} (use complete_spec() to fill them)")


@dataclass(frozen=True)
class ImageSpec(_SpecBase):
    """One shape on a background. Unnamed fields are ``None``; see :meth:`with_defaults`."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    modality: ClassVar[Modality] = Modality.IMAGE

    def __post_init__(self) -> None:
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("background", self.background, BACKGROUNDS)
        if self.colour is not None and self.colour == self.background:
            raise ValueError(f"a {self.colour} shape cannot be drawn on a {self.background} background")

    def with_defaults(self) -> "ImageSpec":
        """Fill unnamed size, position and background with the caption grammar's defaults."""
        return replace(self, **{k: v for k, v in IMAGE_DEFAULTS.items() if getattr(self, k) is None})

    def caption(self) -> str:
        """The canonical caption: defaults (medium, center, black) are left unsaid."""
        if self.colour is None or self.shape is None:
            raise ValueError("an image caption needs a colour and a shape")
        words = ([self.size] if self.size not in (None, "medium") else []) + [self.colour, self.shape]
        text = f"{_article(words[0])} {' '.join(words)}"
        if self.position not in (None, "center"):
            text += f" {_POSITION_PHRASES[self.position]}"
        if self.background not in (None, "black"):
            text += f" on {_article(self.background)} {self.background} background"
        return text


@dataclass(frozen=True)
class AudioSpec(_SpecBase):
    """A tone. ``register`` follows from ``note`` when a note is given (and must agree with it)."""

    note: str | None = None
    waveform: str | None = None
    duration: str | None = None
    register: str | None = None
    modality: ClassVar[Modality] = Modality.AUDIO

    def __post_init__(self) -> None:
        _check_choice("note", self.note, NOTES)
        _check_choice("waveform", self.waveform, WAVEFORMS)
        _check_choice("duration", self.duration, DURATIONS)
        _check_choice("register", self.register, REGISTERS)
        if self.note is not None:
            derived = note_register(self.note)
            if self.register is None:
                object.__setattr__(self, "register", derived)  # frozen: set once, here
            elif self.register != derived:
                raise ValueError(f"{self.note} is a {derived} note, not {self.register}")

    @property
    def frequency(self) -> float | None:
        """Fundamental frequency in Hz, or None without a note."""
        return None if self.note is None else NOTES[self.note]

    @property
    def seconds(self) -> float | None:
        return None if self.duration is None else DURATIONS[self.duration]

    def caption(self) -> str:
        """``a high sine tone of A5 lasting half a second``; unnamed parts are left out."""
        if self.waveform is None or self.register is None:
            raise ValueError("an audio caption needs a waveform and a note or register")
        text = f"a {self.register} {self.waveform} tone"
        if self.note is not None:
            text += f" of {self.note}"
        if self.duration is not None:
            text += f" lasting {DURATION_PHRASES[self.duration]}"
        return text


@dataclass(frozen=True)
class VideoSpec(_SpecBase):
    """One shape of one colour crossing a black frame in one direction."""

    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    modality: ClassVar[Modality] = Modality.VIDEO

    def __post_init__(self) -> None:
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("direction", self.direction, DIRECTIONS)

    def caption(self) -> str:
        if self.colour is None or self.shape is None or self.direction is None:
            raise ValueError("a video caption needs a colour, a shape and a direction")
        return f"{_article(self.colour)} {self.colour} {self.shape} moving {self.direction}"


Spec = Union[ImageSpec, AudioSpec, VideoSpec]
_SPEC_TYPES: dict[Modality, type] = {Modality.IMAGE: ImageSpec, Modality.AUDIO: AudioSpec,
                                     Modality.VIDEO: VideoSpec}
_POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                     "top": "at the top", "bottom": "at the bottom"}


def note_register(note: str) -> str:
    """``"low"`` or ``"high"`` for a note name in ``NOTES``."""
    _check_choice("note", note, NOTES)
    return next(r for r, notes in REGISTERS.items() if note in notes)


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Inverse of ``spec.to_dict()``."""
    data = dict(data)
    modality = _media_modality(data.pop("modality", None))
    return _SPEC_TYPES[modality](**data)


def _media_modality(value: Modality | str | None) -> Modality:
    if value is None:
        raise ValueError("a modality is required: image, audio or video")
    m = Modality.parse(value)
    if m not in _SPEC_TYPES:
        raise ValueError(f"the toy world has no {m.value} media; expected one of: image, audio, video")
    return m


def is_held_out(spec: Spec) -> bool:
    """True if the spec holds a pair from ``HELD_OUT`` (only fully named pairs count)."""
    if isinstance(spec, ImageSpec):
        return (spec.colour, spec.shape) in HELD_OUT.image
    if isinstance(spec, AudioSpec):
        return (spec.note, spec.waveform) in HELD_OUT.audio
    if isinstance(spec, VideoSpec):
        return (spec.colour, spec.direction) in HELD_OUT.video or (spec.colour, spec.shape) in HELD_OUT.image
    raise TypeError(f"not a toy-world spec: {type(spec).__name__}")


def _check_split(split: str, allow_all: bool = False) -> None:
    allowed = SPLITS + (("all",) if allow_all else ())
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(allowed)}")


def _in_split(spec: Spec, split: str) -> bool:
    return split == "all" or is_held_out(spec) == (split == "heldout")


# ----------------------------------------------------------------------------- enumeration, sampling


def as_generator(rng: int | np.random.Generator) -> np.random.Generator:
    """A Generator from a seed (or the Generator itself). ``None`` is refused: samplers are seeded."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"expected an int seed or a numpy.random.Generator, got {rng!r}")


@lru_cache(maxsize=None)
def _all_specs(modality: Modality) -> tuple[Spec, ...]:
    if modality is Modality.IMAGE:
        return tuple(ImageSpec(c, s, z, p, b) for c in COLOURS for s in SHAPES for z in SIZES
                     for p in POSITIONS for b in BACKGROUNDS if b != c)
    if modality is Modality.AUDIO:
        return tuple(AudioSpec(n, w, d) for n in NOTES for w in WAVEFORMS for d in DURATIONS)
    return tuple(VideoSpec(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS)


def all_specs(modality: Modality | str, split: str = "all",
              restrict: Mapping[str, Sequence[str]] | None = None) -> list[Spec]:
    """Every complete spec of a modality in ``split`` ("train", "heldout" or "all").

    ``restrict`` maps field names to allowed values, e.g. ``{"background": ["black"]}`` for a
    simpler training world.
    """
    m = _media_modality(modality)
    _check_split(split, allow_all=True)
    specs = [s for s in _all_specs(m) if _in_split(s, split)]
    if restrict:
        names = tuple(f.name for f in fields(_SPEC_TYPES[m]))
        for key, values in restrict.items():
            if key not in names:
                raise ValueError(f"{m.value} specs have no field {key!r}; expected one of: {', '.join(names)}")
            if isinstance(values, str):
                raise ValueError(f"restrict[{key!r}] must be a list of values, not the string {values!r}")
            for v in values:  # validate the names through the dataclass
                _SPEC_TYPES[m](**{key: v})
            specs = [s for s in specs if getattr(s, key) in values]
    if not specs:
        raise ValueError(f"no {m.value} spec in split {split!r} satisfies restrict={dict(restrict or {})}")
    return specs


def sample_specs(modality: Modality | str, n: int, rng: int | np.random.Generator, split: str = "train",
                 restrict: Mapping[str, Sequence[str]] | None = None) -> list[Spec]:
    """``n`` complete specs drawn uniformly (with replacement) from :func:`all_specs`."""
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = all_specs(modality, split, restrict)
    idx = as_generator(rng).integers(0, len(pool), size=n)
    return [pool[i] for i in idx]


def complete_spec(spec: Spec, rng: int | np.random.Generator | None = None, split: str = "all") -> Spec:
    """Fill a partial spec (e.g. a parsed prompt) so that it can be rendered.

    Image fields take the caption grammar's defaults first. Anything still unnamed is drawn
    with ``rng`` among the complete specs of ``split`` that match; without ``rng`` the first
    match is taken, so the result is deterministic either way.
    """
    if isinstance(spec, ImageSpec):
        spec = spec.with_defaults()
    if spec.is_complete:
        return spec
    pool = [s for s in all_specs(spec.modality, split) if spec.matches(s)]
    if not pool:
        raise ValueError(f"no complete {spec.modality.value} spec in split {split!r} matches {spec}")
    return pool[0] if rng is None else pool[int(as_generator(rng).integers(len(pool)))]


# ----------------------------------------------------------------------------- rendering


def _background(name: str, height: int, width: int) -> np.ndarray:
    top, bottom = (np.asarray(c, dtype=np.float64) for c in BACKGROUNDS[name])
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()


_SUPERSAMPLE = 4  # anti-aliased edges: coverage of 4x4 sub-pixels
# Shapes and timbres outside the world: renderers draw them only when asked to (an encoder's
# augmentation, so that colour and pitch are read apart from shape and timbre); no spec names them.
AUGMENT_SHAPES: tuple[str, ...] = ("diamond", "ring", "bar")


def _coverage(shape: str, cx: float, cy: float, side: float, res: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (centre and side in pixels)."""
    k = _SUPERSAMPLE
    coords = (np.arange(res * k) + 0.5) / k
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    h = side / 2.0
    if shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif shape == "square":
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # apex up, base at the bottom of the bounding box
        inside = (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    elif shape == "cross":  # a plus sign with arms a third of the side wide
        arm = side / 6.0
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= h)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= h))
    elif shape == "diamond":  # off-world shapes, for augmentation (never in captions)
        inside = np.abs(dx) + np.abs(dy) <= h
    elif shape == "ring":
        r2 = dx * dx + dy * dy
        inside = (r2 <= h * h) & (r2 >= (0.55 * h) ** 2)
    elif shape == "bar":
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= 0.45 * h)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of: {', '.join(SHAPES + AUGMENT_SHAPES)}")
    return inside.reshape(res, k, res, k).mean(axis=(1, 3))


def _composite(background: np.ndarray, colour: str, alpha: np.ndarray,
               rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    fg = np.asarray(COLOURS[colour] if rgb is None else rgb, dtype=np.float64)
    out = background * (1.0 - alpha[..., None]) + fg * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_resolution(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def render_image(spec: ImageSpec, rng: int | np.random.Generator | None = None,
                 resolution: int = IMAGE_SIZE, rgb: tuple[float, float, float] | None = None,
                 shape: str | None = None) -> np.ndarray:
    """Draw a complete :class:`ImageSpec` as a (resolution, resolution, 3) uint8 array.

    Without ``rng`` the shape sits exactly at its nominal place and size; with one it is
    shifted by up to 2 px (at 64 px) and scaled by up to 5%, so a model cannot memorise pixels.
    ``rgb`` paints the shape in that colour instead of ``spec.colour``, and ``shape`` draws that
    shape (e.g. one of :data:`AUGMENT_SHAPES`) instead of ``spec.shape`` (augmentation).
    """
    spec._require_complete()
    res = _check_resolution("resolution", resolution, 16)
    side = SIZES[spec.size] * res
    ox, oy = POSITIONS[spec.position]
    cx = res / 2 + ox * POSITION_OFFSET * res
    cy = res / 2 + oy * POSITION_OFFSET * res
    if rng is not None:
        g = as_generator(rng)
        jx, jy = g.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2) * res
        cx, cy = cx + jx, cy + jy
        side *= 1.0 + g.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    alpha = _coverage(shape or spec.shape, cx, cy, side, res)
    return _composite(_background(spec.background, res, res), spec.colour, alpha, rgb)


@lru_cache(maxsize=None)
def _wavetable(waveform: str, frequency: float, size: int = 4096,
               harmonics: tuple[float, ...] | None = None) -> np.ndarray:
    """One period of a band-limited waveform (additive synthesis), peak-normalised to 1.
    ``harmonics`` (amplitudes of harmonics 1, 2, ...) replaces the named waveform's."""
    phase = np.arange(size) / size * 2.0 * np.pi
    n_harm = max(1, int(_HARMONIC_LIMIT_HZ // frequency))
    wave = np.zeros(size)
    for k in range(1, n_harm + 1):
        if harmonics is not None:
            if k > len(harmonics):
                break
            wave += harmonics[k - 1] * np.sin(k * phase)
            continue
        if waveform == "sine" and k > 1:
            break
        if waveform == "square" and k % 2 == 0:
            continue
        wave += np.sin(k * phase) / k  # square: odd 1/k; sawtooth: all 1/k
    return wave / np.abs(wave).max()


def render_audio(spec: AudioSpec, rng: int | np.random.Generator | None = None,
                 frequency: float | None = None, harmonics: tuple[float, ...] | None = None) -> np.ndarray:
    """Synthesise a complete :class:`AudioSpec` as ``CLIP_SAMPLES`` float32 samples at 16 kHz.

    The tone starts at 0 with a 10 ms attack and ends with a 30 ms release; the rest of the
    clip is silence. Peak amplitude is 0.5; with ``rng`` the start phase is random and the
    amplitude varies in [0.4, 0.6]. ``frequency`` (Hz) plays that pitch instead of ``spec.note``,
    and ``harmonics`` (amplitudes of harmonics 1, 2, ...) that timbre instead of ``spec.waveform``
    (augmentation).
    """
    spec._require_complete()
    f0 = NOTES[spec.note] if frequency is None else float(frequency)
    if not 20.0 <= f0 <= SAMPLE_RATE / 2:
        raise ValueError(f"frequency must be in [20, {SAMPLE_RATE // 2}] Hz, got {frequency!r}")
    amp, phase0 = 0.5, 0.0
    if rng is not None:
        g = as_generator(rng)
        amp, phase0 = g.uniform(0.4, 0.6), g.uniform(0.0, 1.0)
    n_tone = min(CLIP_SAMPLES, int(round(DURATIONS[spec.duration] * SAMPLE_RATE)))
    table = _wavetable(spec.waveform, f0, harmonics=None if harmonics is None else tuple(map(float, harmonics)))
    cycles = (phase0 + f0 * np.arange(n_tone) / SAMPLE_RATE) % 1.0
    pos = cycles * len(table)
    tone = np.interp(pos, np.arange(len(table) + 1), np.append(table, table[0]))
    env = np.ones(n_tone)
    for n_ramp, sl in ((int(_ATTACK_S * SAMPLE_RATE), slice(None, None)),
                       (int(_RELEASE_S * SAMPLE_RATE), slice(None, None, -1))):
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
        env[sl][:n_ramp] *= ramp
    out = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    out[:n_tone] = amp * tone * env
    return out


def render_video(spec: VideoSpec, rng: int | np.random.Generator | None = None,
                 resolution: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES,
                 rgb: tuple[float, float, float] | None = None, shape: str | None = None) -> np.ndarray:
    """Render a complete :class:`VideoSpec` as (frames, resolution, resolution, 3) uint8.

    The shape's centre travels in a straight line from -0.2 to +0.2 of the frame side along
    the direction; with ``rng`` the path is shifted sideways by up to 8% and along by up to 4%.
    """
    spec._require_complete()
    res = _check_resolution("resolution", resolution, 16)
    n = _check_resolution("frames", frames, 2)
    ux, uy = DIRECTIONS[spec.direction]
    side_shift, along_shift = 0.0, 0.0
    if rng is not None:
        side_shift, along_shift = as_generator(rng).uniform(-_VIDEO_JITTER, _VIDEO_JITTER, size=2)
    t = np.linspace(-VIDEO_TRAVEL, VIDEO_TRAVEL, n) + along_shift / 2
    bg = _background("black", res, res)
    out = np.empty((n, res, res, 3), dtype=np.uint8)
    for i, ti in enumerate(t):
        # along the motion: ti; across it: side_shift (the perpendicular axis is (-uy, ux))
        cx = res / 2 + (ux * ti - uy * side_shift) * res
        cy = res / 2 + (uy * ti + ux * side_shift) * res
        alpha = _coverage(shape or spec.shape, cx, cy, VIDEO_OBJECT_SIZE * res, res)
        out[i] = _composite(bg, spec.colour, alpha, rgb)
    return out


def render(spec: Spec, rng: int | np.random.Generator | None = None) -> np.ndarray:
    """Render any complete spec at the world's default sizes."""
    if isinstance(spec, ImageSpec):
        return render_image(spec, rng)
    if isinstance(spec, AudioSpec):
        return render_audio(spec, rng)
    if isinstance(spec, VideoSpec):
        return render_video(spec, rng)
    raise TypeError(f"not a toy-world spec: {type(spec).__name__}")


def to_pil(image: np.ndarray) -> "Any":
    """A (H, W, 3) uint8 array as a PIL image; a video's frames as a list of PIL images."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 4:
        return [Image.fromarray(f) for f in arr]
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- samples and banks


@dataclass
class Sample:
    """One paired example: the truth (``spec``), its caption and the rendered media."""

    spec: Spec
    caption: str
    data: np.ndarray

    @property
    def modality(self) -> Modality:
        return self.spec.modality


def sample(modality: Modality | str, rng: int | np.random.Generator, split: str = "train",
           restrict: Mapping[str, Sequence[str]] | None = None) -> Sample:
    """Draw one rendered example of ``split`` ("train" or "heldout")."""
    g = as_generator(rng)
    spec = sample_specs(modality, 1, g, split, restrict)[0]
    return Sample(spec, spec.caption(), render(spec, g))


@dataclass
class Bank:
    """Pre-rendered examples, stacked so that training can index them many times.

    ``data`` is (N, 64, 64, 3) uint8 for images, (N, CLIP_SAMPLES) float32 for audio and
    (N, 8, 32, 32, 3) uint8 for video; ``captions[i]`` and ``specs[i]`` describe ``data[i]``.
    """

    modality: Modality
    data: np.ndarray
    captions: list[str]
    specs: list[Spec]
    split: str
    seed: int

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.specs[i], self.captions[i], self.data[i])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (arrays plus JSON specs); :meth:`load` reads it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"modality": self.modality.value, "split": self.split, "seed": self.seed,
                           "captions": self.captions, "specs": [s.to_dict() for s in self.specs]})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:  # np.savez on a path would append ".npz" to the temp name
            np.savez(fh, data=self.data, meta=np.array(meta))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bank":
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            data = z["data"]
        return cls(Modality.parse(meta["modality"]), data, list(meta["captions"]),
                   [spec_from_dict(d) for d in meta["specs"]], meta["split"], int(meta["seed"]))


def make_bank(modality: Modality | str, n: int, split: str = "train", seed: int = 0,
              restrict: Mapping[str, Sequence[str]] | None = None, jitter: bool = True) -> Bank:
    """Render ``n`` examples of one modality once (under 1 ms each on one CPU core).

    Deterministic in ``seed``. ``jitter=False`` renders every spec at its nominal geometry.
    """
    m = _media_modality(modality)
    g = as_generator(seed)
    specs = sample_specs(m, n, g, split, restrict)
    if m is Modality.AUDIO:
        data = np.zeros((n, CLIP_SAMPLES), dtype=np.float32)
    elif m is Modality.IMAGE:
        data = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    else:
        data = np.zeros((n, VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        data[i] = render(spec, g if jitter else None)
    return Bank(m, data, [s.caption() for s in specs], specs, split, int(seed))


# ----------------------------------------------------------------------------- parsing

_SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "saw": "sawtooth", "color": "colour"}
# Instruction and grammar words that carry no field value.
_FILLER = frozenset("""
a an the of on at in to is it its it's this that there here s with and lasting moving moves
shape tone wave waveform note sound image picture photo video clip animation animate please me
draw paint show make generate create render play give i want see can you could would like
sized one now colour
""".split())
_AUDIO_MARKERS = frozenset({"tone", "wave", "waveform", "play", "sound", "note", "sine", "sawtooth"})
_VIDEO_MARKERS = frozenset({"moving", "moves", "video", "clip", "animate", "animation"})
_NOTE_RE = re.compile(r"^[a-g][#b]?\d$")
_DURATION_PATTERNS = ((re.compile(r"\bhalf (?:a )?seconds?\b|\b0 5 seconds?\b|\bshort\b"), " dur_short "),
                      (re.compile(r"\b(?:one|a|1) seconds?\b|\blong\b"), " dur_long "))


def _words(text: str) -> list[str]:
    text = text.lower().replace("-", " ").replace(".", " ")
    return [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z0-9#]+", text)]


def _field_words(modality: Modality) -> dict[str, dict[str, str]]:
    """For each field of a modality, the words that name a value (word -> value)."""
    if modality is Modality.IMAGE:
        return {"colour": {c: c for c in COLOURS}, "shape": {s: s for s in SHAPES},
                "size": {z: z for z in SIZES}, "position": {p: p for p in POSITIONS}}
    if modality is Modality.AUDIO:
        return {"waveform": {w: w for w in WAVEFORMS}, "register": {r: r for r in REGISTERS},
                "duration": {f"dur_{d}": d for d in DURATIONS}}
    return {"colour": {c: c for c in COLOURS}, "shape": {s: s for s in SHAPES},
            "direction": {d: d for d in DIRECTIONS}}


def _read_fields(modality: Modality, words: list[str]) -> dict[str, str] | None:
    """Assign each word to a field of ``modality``; None on an unknown word or a conflict."""
    table = _field_words(modality)
    found: dict[str, str] = {}
    for w in words:
        hits = [(f, vals[w]) for f, vals in table.items() if w in vals]
        if modality is Modality.AUDIO and _NOTE_RE.match(w):
            hits = [("note", w[0].upper() + w[1:])]
        if not hits:
            if w in _FILLER:
                continue
            return None
        name, value = hits[0]
        if found.get(name, value) != value:
            return None
        found[name] = value
    return found


def _detect_modality(words: list[str]) -> Modality | None:
    audio = any(w in _AUDIO_MARKERS or _NOTE_RE.match(w) for w in words)
    video = any(w in _VIDEO_MARKERS for w in words)
    if audio and video:
        return None
    if audio:
        return Modality.AUDIO
    if video:
        return Modality.VIDEO
    return Modality.IMAGE if any(w in SHAPES for w in words) else None


def parse_caption(text: str) -> Spec | None:
    """Read a caption, prompt or answer back into a spec; ``None`` if it is not of this world.

    Unnamed fields stay ``None``; an image caption's unsaid defaults are not filled in (use
    ``spec.with_defaults()``). Accepts the grammar's words in its order or not, plus
    instruction words (``draw``, ``play``, ``make a video of`` ...) and a few synonyms
    (centre/middle, big, saw).
    """
    if not isinstance(text, str):
        return None
    joined = " ".join(_words(text))
    for pattern, token in _DURATION_PATTERNS:
        joined = pattern.sub(token, joined)
    words = joined.split()
    modality = _detect_modality(words)
    if modality is None:
        return None
    background = None
    if "background" in words:
        i = words.index("background")
        if words.count("background") > 1 or i == 0 or words[i - 1] not in BACKGROUNDS:
            return None
        if modality is not Modality.IMAGE:
            return None
        background = words[i - 1]
        words = words[: i - 1] + words[i + 1:]
    if modality is Modality.IMAGE and "gradient" in words:
        return None
    found = _read_fields(modality, words)
    if found is None:
        return None
    if modality is Modality.IMAGE:
        found["background"] = background  # type: ignore[assignment]
    if modality is Modality.AUDIO and "note" not in found and "register" not in found and "waveform" not in found:
        return None
    try:
        return _SPEC_TYPES[modality](**found)
    except ValueError:  # e.g. a note outside NOTES, a shape on its own colour, low A5
        return None


# ----------------------------------------------------------------------------- edits


_RELATIVE_EDITS: dict[str, tuple[Modality, str, int]] = {
    "higher": (Modality.AUDIO, "note", +1), "lower": (Modality.AUDIO, "note", -1),
    "longer": (Modality.AUDIO, "duration", +1), "shorter": (Modality.AUDIO, "duration", -1),
    "bigger": (Modality.IMAGE, "size", +1), "larger": (Modality.IMAGE, "size", +1),
    "smaller": (Modality.IMAGE, "size", -1),
}
_ORDERED = {"note": tuple(NOTES), "duration": tuple(DURATIONS), "size": tuple(SIZES)}
_EDIT_FILLER = frozenset({"now", "make", "it", "a", "an", "the", "to", "move", "put", "on", "sound",
                          "wave", "please", "instead", "turn", "change", "into", "play"})


def apply_edit(spec: Spec, instruction: str) -> Spec | None:
    """Apply an edit instruction to a complete spec; ``None`` if not understood or not allowed.

    Grammar (what :func:`sample_dialogue` says): image ``make it <colour>``, ``make it a
    <shape>``, ``make it bigger|smaller``, ``move it to the <left|right|top|bottom|center>``,
    ``put it on a <background> background``; audio ``now make it sound higher|lower`` (the next
    note in ``NOTES``), ``make it a <waveform> wave``, ``make it shorter|longer``; video
    ``make it move <direction>``, ``make it <colour>``, ``make it a <shape>``.
    """
    words = _words(instruction)
    relative = [w for w in words if w in _RELATIVE_EDITS]
    try:
        if relative:
            if len(relative) != 1 or any(w not in _EDIT_FILLER for w in words if w != relative[0]):
                return None
            modality, name, step = _RELATIVE_EDITS[relative[0]]
            if spec.modality is not modality:
                return None
            order = _ORDERED[name]
            j = order.index(getattr(spec, name)) + step
            if not 0 <= j < len(order):
                return None
            extra = {"register": None} if name == "note" else {}
            return replace(spec, **{name: order[j]}, **extra)
        changes: dict[str, str] = {}
        if "background" in words:
            if spec.modality is not Modality.IMAGE:
                return None
            i = words.index("background")
            if i == 0 or words[i - 1] not in BACKGROUNDS:
                return None
            changes["background"] = words[i - 1]
            words = words[: i - 1] + words[i + 1:]
        found = _read_fields(spec.modality, [w for w in words if w not in _EDIT_FILLER])
        if found is None:
            return None
        changes.update(found)
        if len(changes) != 1:
            return None
        extra = {"register": None} if "note" in changes else {}
        new = replace(spec, **changes, **extra)
    except ValueError:
        return None
    return new if new != spec else None


def _edit_text(old: Spec, new: Spec, name: str) -> str | None:
    """The instruction that turns ``old`` into ``new`` by changing field ``name``, if one exists."""
    a, b = getattr(old, name), getattr(new, name)
    if name in _ORDERED:
        order = _ORDERED[name]
        step = order.index(b) - order.index(a)
        if abs(step) != 1:
            return None
        words = {"note": ("now make it sound higher", "now make it sound lower"),
                 "duration": ("make it longer", "make it shorter"),
                 "size": ("make it bigger", "make it smaller")}[name]
        return words[0] if step > 0 else words[1]
    if name == "colour":
        return f"make it {b}"
    if name == "shape":
        return f"make it a {b}"
    if name == "position":
        return f"move it to the {b}"
    if name == "background":
        return f"put it on {_article(b)} {b} background"
    if name == "waveform":
        return f"make it a {b} wave"
    if name == "direction":
        return f"make it move {b}"
    return None


_EDIT_FIELDS: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("colour", "shape", "size", "position", "background"),
    Modality.AUDIO: ("note", "waveform", "duration"),
    Modality.VIDEO: ("colour", "shape", "direction"),
}

# ----------------------------------------------------------------------------- dialogues

Role = Literal["user", "assistant"]


class Part(TypedDict, total=False):
    """A content part: ``type`` is text, image, audio or video (see the module docstring)."""

    type: str
    text: str
    spec: Spec
    image: np.ndarray
    audio: np.ndarray
    sample_rate: int
    video: np.ndarray


class Turn(TypedDict):
    role: Role
    content: list[Part]


@dataclass
class Dialogue:
    """An instruction dialogue.

    ``question`` is the asked field (or ``"caption"``) for i2t/a2t/v2t, for use with
    ``checkers.check_answer(question, answer, target)``; ``target`` is the spec the last
    assistant turn must be about (the media it makes, or the media it was asked about).
    """

    task: str
    turns: list[Turn]
    target: Spec
    question: str | None = None
    asked: Spec | None = None  # what a reworded request names (rephrase); None: read it from the prompt

    def texts(self) -> list[tuple[str, str]]:
        """(role, text) of every text part, in order."""
        return [(t["role"], p["text"]) for t in self.turns for p in t["content"] if p["type"] == "text"]


TASKS: tuple[str, ...] = ("t2i", "t2a", "t2v", "i2t", "a2t", "v2t", "i2i", "edit_image", "edit_audio", "edit_video")
_TASK_MODALITY = {"t2i": Modality.IMAGE, "t2a": Modality.AUDIO, "t2v": Modality.VIDEO, "i2t": Modality.IMAGE,
                  "a2t": Modality.AUDIO, "v2t": Modality.VIDEO, "i2i": Modality.IMAGE,
                  "edit_image": Modality.IMAGE, "edit_audio": Modality.AUDIO, "edit_video": Modality.VIDEO}
_GENERATE_TEMPLATES = {
    Modality.IMAGE: ("draw {}", "show me {}", "make an image of {}", "{}"),
    Modality.AUDIO: ("play {}", "make a sound of {}", "{}"),
    Modality.VIDEO: ("make a video of {}", "animate {}", "{}"),
}
# field -> (question, how the answer is worded from the value)
_QUESTIONS: dict[Modality, dict[str, tuple[str, Any]]] = {
    Modality.IMAGE: {
        "colour": ("what colour is the shape?", str),
        "shape": ("what shape is this?", str),
        "size": ("how big is the shape?", str),
        "position": ("where is the shape?", lambda v: _POSITION_PHRASES[v]),
        "background": ("what colour is the background?", str),
        "caption": ("describe this image", None),
    },
    Modality.AUDIO: {
        "note": ("what note is this?", str),
        "waveform": ("what waveform is this?", str),
        "duration": ("how long is this tone?", lambda v: DURATION_PHRASES[v]),
        "register": ("is this tone high or low?", str),
        "caption": ("describe this sound", None),
    },
    Modality.VIDEO: {
        "direction": ("which way is it moving?", str),
        "colour": ("what colour is the moving shape?", str),
        "shape": ("what shape is moving?", str),
        "caption": ("describe this video", None),
    },
}


def _media_part(spec: Spec, g: np.random.Generator, rendered: bool) -> Part:
    part: Part = {"type": spec.modality.value, "spec": spec}
    if rendered:
        part[spec.modality.value] = render(spec, g)  # type: ignore[literal-required]
        if isinstance(spec, AudioSpec):
            part["sample_rate"] = SAMPLE_RATE
    return part


def _text(text: str) -> Part:
    return {"type": "text", "text": text}


def _generation_turn(spec: Spec, g: np.random.Generator, rendered: bool) -> Turn:
    return {"role": "assistant", "content": [_text(spec.caption()), _media_part(spec, g, rendered)]}


def _prompt_spec(spec: Spec, g: np.random.Generator) -> Spec:
    """What a user prompt names: audio prompts sometimes leave out the note or the duration."""
    if isinstance(spec, AudioSpec):
        r = g.random()
        if r < 0.2:
            return replace(spec, note=None)  # "play a low square tone lasting one second"
        if r < 0.35:
            return replace(spec, duration=None)
    return spec


def _edit_pair(target: Spec, g: np.random.Generator, split: str) -> tuple[Spec, str]:
    """A starting spec and the instruction that turns it into ``target``."""
    names = list(_EDIT_FIELDS[target.modality])
    g.shuffle(names)
    for name in names:
        others = [n for n in _EDIT_FIELDS[target.modality] if n != name]
        options = []
        for s in _all_specs(target.modality):
            if getattr(s, name) == getattr(target, name) or any(getattr(s, n) != getattr(target, n) for n in others):
                continue
            if split == "train" and is_held_out(s):
                continue
            text = _edit_text(s, target, name)
            if text is not None:
                options.append((s, text))
        if options:
            return options[int(g.integers(len(options)))]
    raise RuntimeError(f"no edit leads to {target}")  # cannot happen with the vocabulary above


def sample_dialogue(rng: int | np.random.Generator, split: str = "train", tasks: Sequence[str] | None = None,
                    render_media: bool = True) -> Dialogue:
    """Draw one instruction dialogue (task chosen uniformly from ``tasks``, default all ``TASKS``).

    In ``split="train"`` no spec in the dialogue is held out; in ``"heldout"`` the target is.
    With ``render_media=False`` media parts carry only their spec (render later with
    :func:`render`), which is how a training loop can keep dialogues cheap.
    """
    g = as_generator(rng)
    _check_split(split)
    tasks = TASKS if tasks is None else tuple(tasks)
    for t in tasks:
        _check_choice("task", t, TASKS)
    if not tasks:
        raise ValueError(f"tasks must not be empty; expected some of: {', '.join(TASKS)}")
    task = tasks[int(g.integers(len(tasks)))]
    modality = _TASK_MODALITY[task]
    target = sample_specs(modality, 1, g, split)[0]
    question = None
    if task in ("t2i", "t2a", "t2v"):
        templates = _GENERATE_TEMPLATES[modality]
        prompt = templates[int(g.integers(len(templates)))].format(_prompt_spec(target, g).caption())
        turns: list[Turn] = [{"role": "user", "content": [_text(prompt)]}, _generation_turn(target, g, render_media)]
    elif task in ("i2t", "a2t", "v2t"):
        qs = _QUESTIONS[modality]
        question = list(qs)[int(g.integers(len(qs)))]
        text, word = qs[question]
        answer = target.caption() if word is None else word(getattr(target, question))
        turns = [{"role": "user", "content": [_media_part(target, g, render_media), _text(text)]},
                 {"role": "assistant", "content": [_text(answer)]}]
    elif task == "i2i":
        start, instruction = _edit_pair(target, g, split)
        turns = [{"role": "user", "content": [_media_part(start, g, render_media), _text(instruction)]},
                 _generation_turn(target, g, render_media)]
    else:  # edit_image / edit_audio / edit_video: make something, then change it
        start, instruction = _edit_pair(target, g, split)
        templates = _GENERATE_TEMPLATES[modality]
        prompt = templates[int(g.integers(len(templates)))].format(start.caption())
        turns = [{"role": "user", "content": [_text(prompt)]}, _generation_turn(start, g, render_media),
                 {"role": "user", "content": [_text(instruction)]}, _generation_turn(target, g, render_media)]
    return Dialogue(task, turns, target, question)


__all__ = [
    "AUGMENT_SHAPES", "AudioSpec", "BACKGROUNDS", "Bank", "CLIP_SAMPLES", "COLOURS", "DIRECTIONS", "DURATIONS", "DURATION_PHRASES",
    "Dialogue", "HELD_OUT", "HeldOut", "IMAGE_DEFAULTS", "IMAGE_SIZE", "ImageSpec", "NOTES", "POSITIONS",
    "POSITION_OFFSET", "Part", "REGISTERS", "SAMPLE_RATE", "SHAPES", "SIZES", "SPLITS", "Sample", "Spec", "TASKS",
    "Turn", "VIDEO_FRAMES", "VIDEO_OBJECT_SIZE", "VIDEO_SIZE", "VIDEO_TRAVEL", "VideoSpec", "WAVEFORMS",
    "all_specs", "apply_edit", "as_generator", "complete_spec", "is_held_out", "make_bank", "note_register",
    "parse_caption", "render", "render_audio", "render_image", "render_video", "sample", "sample_dialogue",
    "sample_specs", "spec_from_dict", "to_pil",
]


# ----------------------------------------------------------------------------- the way people ask
# Requests and questions as people type them, beyond the canonical templates above: politeness,
# filler and unknown words, capitals and punctuation. Two disjoint sets of forms: "train" forms
# are what training may use; "heldout" forms are only ever evaluated (`anymodal eval --style
# paraphrase`), so a score on them measures understanding, not recall of a template. Words the
# world's tokenizer does not know read as [UNK]; the model has to learn to look past them.
STYLES = ("plain", "paraphrase")
_ASK_GENERATE: dict[str, dict[Modality, tuple[str, ...]]] = {
    "train": {
        Modality.IMAGE: ("could you draw {}?", "please draw {}", "can you show me {}?", "i'd like an image of {}",
                         "i want to see {}", "draw me {}, please", "hey, make an image of {}!", "show {} please",
                         "can you draw {} for me?", "i need a picture of {}", "paint {}", "please make {}"),
        Modality.AUDIO: ("could you play {}?", "please play {}", "can you make a sound of {}?", "i'd like {}",
                         "i want to hear {}", "play me {}, please", "hey, play {}!", "give me {}",
                         "can you play {} for me?", "let me hear {}", "i need {}"),
        Modality.VIDEO: ("could you animate {}?", "please make a video of {}", "can you show me a video of {}?",
                         "i'd like a video of {}", "i want to see {}", "animate {}, please", "hey, make a video of {}!",
                         "show me {} please", "can you make {} for me?", "i need a clip of {}"),
    },
    "heldout": {
        Modality.IMAGE: ("would you mind drawing {}?", "Could I get a picture of {}, thanks!", "i would love {}.",
                         "Kindly draw {}.", "go ahead and show me {}", "so, um, draw {} maybe?",
                         "Can you sketch {} please?", "I'd really like to see {}!"),
        Modality.AUDIO: ("would you mind playing {}?", "Could I hear {}, thanks!", "i would love {}.",
                         "Kindly play {}.", "go ahead and play {}", "so, um, play {} maybe?",
                         "Can you produce {} please?", "I'd really like to hear {}!"),
        Modality.VIDEO: ("would you mind animating {}?", "Could I get a video of {}, thanks!", "i would love {}.",
                         "Kindly animate {}.", "go ahead and show me {}", "so, um, make a video of {} maybe?",
                         "Can you create a clip of {} please?", "I'd really like to see {}!"),
    },
}
# per modality and question field: other ways to ask it (the canonical question is in _QUESTIONS)
_ASK_QUESTION: dict[str, dict[Modality, dict[str, tuple[str, ...]]]] = {
    "train": {
        Modality.IMAGE: {"colour": ("what color is the shape?", "which colour is it?", "tell me the colour of the shape",
                                    "what colour is the shape in this picture?"),
                         "shape": ("what is the shape in this picture?", "which shape is it?", "tell me the shape",
                                   "what shape is in this image?"),
                         "size": ("how big is it?", "is the shape big or small?", "tell me how big the shape is"),
                         "position": ("where is it?", "where is the shape in the picture?", "tell me where the shape is"),
                         "background": ("what color is the background?", "which colour is the background?",
                                        "tell me the background colour"),
                         "caption": ("describe this picture", "what is in this picture?", "what do you see?",
                                     "tell me about this image")},
        Modality.AUDIO: {"note": ("which note is it?", "what note is this tone?", "tell me the note"),
                         "waveform": ("what kind of wave is this?", "which waveform is it?", "tell me the waveform"),
                         "duration": ("how long is it?", "how long does this tone last?", "tell me how long it is"),
                         "register": ("is it high or low?", "is this sound high or low?", "high or low?"),
                         "caption": ("what is this sound?", "describe what you hear", "tell me about this sound")},
        Modality.VIDEO: {"direction": ("where is it going?", "which way does the shape move?", "tell me the direction"),
                         "colour": ("what color is the moving shape?", "which colour is moving?",
                                    "tell me the colour of the shape"),
                         "shape": ("what is moving?", "which shape moves?", "tell me the moving shape"),
                         "caption": ("what happens in this video?", "describe this clip", "tell me about this video")},
    },
    "heldout": {
        Modality.IMAGE: {"colour": ("What's the colour of this shape?", "Can you tell me what color the shape is?"),
                         "shape": ("What's the shape here?", "Can you tell me which shape this is?"),
                         "size": ("How large is the shape, would you say?", "Is it a big shape or a small one?"),
                         "position": ("Where's the shape placed?", "Can you tell me where the shape sits?"),
                         "background": ("What's the background colour here?", "Which color is behind the shape?"),
                         "caption": ("Could you describe this picture for me?", "What's in this image?")},
        Modality.AUDIO: {"note": ("What's the note here?", "Can you tell me which note this is?"),
                         "waveform": ("What's the waveform here?", "Can you tell me what wave this is?"),
                         "duration": ("How long's this tone?", "Can you tell me how long this lasts?"),
                         "register": ("Is the tone high, or is it low?", "High tone or low tone?"),
                         "caption": ("Could you describe this sound for me?", "What's this sound?")},
        Modality.VIDEO: {"direction": ("Which way's it moving?", "Can you tell me which way the shape moves?"),
                         "colour": ("What's the colour of the moving shape?", "Which color is the shape that moves?"),
                         "shape": ("What's the shape that moves?", "Can you tell me what shape is moving?"),
                         "caption": ("Could you describe this video for me?", "What's in this clip?")},
    },
}
_FILLERS = {"train": ("please", "hey", "so", "um", "just", "really", "ok"),
            "heldout": ("well", "uh", "kindly", "basically", "thanks")}


def _casing(text: str, g: np.random.Generator) -> str:
    r = g.random()
    if r < 0.3:
        return text[:1].upper() + text[1:]
    if r < 0.4:
        return text.upper()
    if r < 0.5:
        return text.title()
    return text


def _sprinkle(text: str, g: np.random.Generator, split: str) -> str:
    """Up to two filler words at random word boundaries (outside the world's vocabulary they read as [UNK])."""
    words = text.split()
    for _ in range(int(g.integers(0, 3))):
        fillers = _FILLERS[split]
        words.insert(int(g.integers(0, len(words) + 1)), fillers[int(g.integers(len(fillers)))])
    return " ".join(words)


def ask_for(spec: Spec, g: np.random.Generator, forms: str = "train") -> str:
    """A request for ``spec``'s medium in one of the ``forms`` ("train" or "heldout") ways of asking."""
    return _ask_for(spec, g, forms)[0]


def _ask_for(spec: Spec, g: np.random.Generator, forms: str) -> tuple[str, Spec]:
    """The request and the spec it names (an audio request may leave out the note or the duration)."""
    _check_choice("forms", forms, ("train", "heldout"))
    templates = _ASK_GENERATE[forms][spec.modality]
    asked = _prompt_spec(spec, g)
    text = templates[int(g.integers(len(templates)))].format(asked.caption())
    return _casing(_sprinkle(text, g, forms) if g.random() < 0.5 else text, g), asked


def ask_about(modality: Modality | str, question: str, g: np.random.Generator, forms: str = "train") -> str:
    """``question`` (a field of ``modality``, or "caption") asked in one of the ``forms`` ways."""
    _check_choice("forms", forms, ("train", "heldout"))
    m = _media_modality(modality)
    options = _ASK_QUESTION[forms][m][question]
    text = options[int(g.integers(len(options)))]
    return _casing(_sprinkle(text, g, forms) if g.random() < 0.3 else text, g)


def rephrase(dialogue: Dialogue, g: np.random.Generator, forms: str = "train") -> Dialogue:
    """``dialogue`` with its first user turn's text asked another way (a generation request, or a
    question about the given medium); other tasks (edits) keep their wording."""
    turns = [dict(t, content=list(t["content"])) for t in dialogue.turns]
    first = turns[0]["content"]
    k = next(i for i, p in enumerate(first) if p["type"] == "text")
    asked = None
    if dialogue.task in ("t2i", "t2a", "t2v"):
        text, asked = _ask_for(dialogue.target, g, forms)
        first[k] = _text(text)
    elif dialogue.question is not None:
        first[k] = _text(ask_about(dialogue.target.modality, dialogue.question, g, forms))
    return replace(dialogue, turns=turns, asked=asked)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sessions


@dataclass
class Session:
    """A multi-turn session: ``turns`` alternate user and assistant; ``checks`` has one entry per user
    turn: its direction (t2i/t2a/t2v for requests and edits, i2t/a2t/v2t for questions), the spec
    the reply must be about, the question field (or None) and the user turn's index in ``turns``."""

    turns: list[Turn]
    checks: list[dict[str, Any]]

    def as_dialogue(self) -> Dialogue:
        last = self.checks[-1]
        return Dialogue("session", self.turns, last["target"], last["question"])


_DIRECTION = {Modality.IMAGE: ("t2i", "i2t"), Modality.AUDIO: ("t2a", "a2t"), Modality.VIDEO: ("t2v", "v2t")}


def sample_session(rng: int | np.random.Generator, split: str = "train", n_turns: tuple[int, int] = (3, 5),
                   forms: str | None = "train", render_media: bool = True) -> Session:
    """Draw a session of ``n_turns`` (inclusive range) mixed turns: requests for a medium, edits of the
    last medium made ("now make it blue", acting on what it refers to), and questions about a medium
    the user attaches. With ``forms`` ("train"/"heldout") about half the requests and questions are
    asked in that set's other ways; None keeps every turn canonical. In ``split="heldout"`` each
    requested or asked-about spec is a held-out combination (edits lead to any spec)."""
    g = as_generator(rng)
    _check_split(split)
    n = int(g.integers(n_turns[0], n_turns[1] + 1))
    turns: list[Turn] = []
    checks: list[dict[str, Any]] = []
    last: Spec | None = None
    for _ in range(n):
        kind = ("generate", "question", "edit")[int(g.integers(3 if last is not None else 2))]
        modality = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)[int(g.integers(3))]
        question = None
        if kind == "edit":
            assert last is not None
            names = list(_EDIT_FIELDS[last.modality])
            g.shuffle(names)
            options = []
            for name in names:
                for s in _all_specs(last.modality):
                    if getattr(s, name) != getattr(last, name) and all(
                            getattr(s, f) == getattr(last, f) for f in _EDIT_FIELDS[last.modality] if f != name):
                        if split == "train" and is_held_out(s):
                            continue
                        text = _edit_text(last, s, name)
                        if text is not None:
                            options.append((s, text))
                if options:
                    break
            if not options:
                kind = "generate"
            else:
                target, text = options[int(g.integers(len(options)))]
                turns += [{"role": "user", "content": [_text(text)]}, _generation_turn(target, g, render_media)]
                checks.append({"direction": _DIRECTION[target.modality][0], "target": target, "question": None,
                               "turn": len(turns) - 2, "kind": "edit"})
                last = target
                continue
        target = sample_specs(modality, 1, g, split)[0]
        styled = forms is not None and g.random() < 0.5
        if kind == "generate":
            if styled:
                text, asked = _ask_for(target, g, forms)
            else:
                templates = _GENERATE_TEMPLATES[modality]
                asked = _prompt_spec(target, g)
                text = templates[int(g.integers(len(templates)))].format(asked.caption())
            turns += [{"role": "user", "content": [_text(text)]}, _generation_turn(target, g, render_media)]
            checks.append({"direction": _DIRECTION[modality][0], "target": target, "question": None,
                           "turn": len(turns) - 2, "kind": "generate", "asked": asked})
            last = target
        else:
            qs = _QUESTIONS[modality]
            question = list(qs)[int(g.integers(len(qs)))]
            text = ask_about(modality, question, g, forms) if styled else qs[question][0]
            word = qs[question][1]
            answer = target.caption() if word is None else word(getattr(target, question))
            turns += [{"role": "user", "content": [_media_part(target, g, render_media), _text(text)]},
                      {"role": "assistant", "content": [_text(answer)]}]
            checks.append({"direction": _DIRECTION[modality][1], "target": target, "question": question,
                           "turn": len(turns) - 2, "kind": "question"})
    return Session(turns, checks)


_COPY_ASKS = ("say {}", "repeat {}", "repeat after me: {}", "please say {}", "can you say {}?")


def _held_out_pairs() -> set[tuple[str, str]]:
    return {(a, b) for pairs in (HELD_OUT.image, HELD_OUT.audio, HELD_OUT.video) for a, b in pairs} | {
        (a.lower(), b) for a, b in HELD_OUT.audio}


def sample_copy(rng: int | np.random.Generator, length: tuple[int, int] = (2, 7)) -> Dialogue:
    """A text-only copy task: "say <words>" answered with the words. The words are the world's own
    (colours, shapes, notes, waveforms, sizes, positions, directions) in random order, so the LLM
    learns to copy what a request names instead of completing it with the combination it saw most:
    "draw a green circle" (a held-out pair) was answered "a green" and an end of turn. No held-out
    pair ever appears next to each other in the words."""
    g = as_generator(rng)
    vocab = (list(COLOURS) + list(SHAPES) + [n.lower() for n in NOTES] + list(WAVEFORMS) + list(SIZES)
             + list(POSITIONS) + list(DIRECTIONS))
    banned = _held_out_pairs()
    while True:
        words = [vocab[int(i)] for i in g.integers(len(vocab), size=int(g.integers(length[0], length[1] + 1)))]
        if not any((a, b) in banned or (b, a) in banned for a, b in zip(words, words[1:])):
            break
    text = " ".join(words)
    ask = _COPY_ASKS[int(g.integers(len(_COPY_ASKS)))].format(text)
    turns: list[Turn] = [{"role": "user", "content": [_text(ask)]}, {"role": "assistant", "content": [_text(text)]}]
    return Dialogue("copy", turns, ImageSpec(), None)


__all__ += ["STYLES", "Session", "ask_about", "ask_for", "rephrase", "sample_copy", "sample_session"]
