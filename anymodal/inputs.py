"""Checks on what a caller hands the pipeline, made before any work, with errors that say what is allowed.

Prompts, seeds, token counts and sampling values are checked here; so are media, from their
headers and shapes only: an image's pixel count and aspect ratio (a few hundred bytes of PNG can
declare gigapixels), animated images given as images, still images given as videos, and the
layout and sample rate of audio arrays.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from .checks import positive_number
from .media import Audio, MediaError, check_image_size, describe, probe_image_file
from .modality import Modality

MAX_SEED = 2**63 - 1
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000
MAX_AUDIO_CHANNELS = 8
MIN_AUDIO_SAMPLES = 64  # below this a 2-D array cannot be told apart from a (samples, channels) one


def check_text(text: Any, where: str = "prompt") -> str:
    """A prompt must be a ``str`` that is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode text: it holds a lone surrogate {text[e.start]!r} at "
                         f"character {e.start}; remove it or decode the source text properly") from None
    return text


def check_prompts(prompt: Any) -> tuple[bool, list[str]]:
    """``(single, prompts)`` from a string or a list/tuple of strings; anything else is refused."""
    if isinstance(prompt, str):
        return True, [check_text(prompt)]
    if prompt is None:
        raise ValueError("prompt is required: a string, or a list of strings for a batch")
    if not isinstance(prompt, (list, tuple)):
        # a dict or set would otherwise be iterated silently (a dict by its keys)
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise TypeError(f"prompt must be a string or a list of strings; prompt[{i}] is {type(p).__name__}")
        check_text(p, f"prompt[{i}]")
    return False, list(prompt)


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {short_int(int(seed))}")
    return int(seed)


def short_int(n: int) -> str:
    """An integer as text, its digits elided past 20 (so that a 4000-digit value is not echoed)."""
    if -10**20 < n < 10**20:
        return str(n)
    digits = n.bit_length() * 30103 // 100000 + 1  # about log10(2) per bit; no str() of a huge int
    return f"{'-' if n < 0 else ''}an integer of about {digits} digits"


def check_max_new_tokens(n: Any) -> int | None:
    """``None`` means the config's default; ``0`` is refused rather than read as "default"."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError("max_new_tokens must be a positive integer (or None for the model's default), got "
                         f"{short_int(int(n)) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else repr(n)}")
    return int(n)


def check_sampling(temperature: Any, top_p: Any) -> None:
    positive_number("temperature", temperature)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


# ---------------------------------------------------------------------------- media
def check_medium(modality: Modality, item: Any) -> None:
    """Refuse a medium whose header or shape already shows it cannot be used as ``modality``
    (its spec's ``check``)."""
    Modality.parse(modality).spec.check(item)


def check_image(item: Any) -> None:
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            return  # the loader names a missing file
        probed = probe_image_file(item)
        if probed is not None and probed[1]:
            raise MediaError(f"cannot read image '{item}': it is an animated image; pass it as a video "
                             "(videos=...), or pass one of its frames as the image")
    elif isinstance(item, Image.Image):
        check_image_size(*item.size, describe(item))
        if getattr(item, "is_animated", False):
            raise MediaError("cannot read image: the PIL image is animated; pass it as a video, or one frame")
    elif isinstance(item, np.ndarray) and item.ndim in (2, 3):
        check_image_size(item.shape[1], item.shape[0], describe(item))


def check_video(item: Any) -> None:
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            return
        probed = probe_image_file(item, kind="video")  # GIF, APNG, WebP: PIL reads their headers; MP4 is not
        if probed is not None and not probed[1]:
            raise MediaError(f"cannot read video '{item}': it is a still image (one frame); pass it as an image "
                             "(images=...)")
    elif isinstance(item, np.ndarray) and item.ndim in (3, 4):
        check_image_size(item.shape[2], item.shape[1], f"(frames {describe(item)})", kind="video")
    elif isinstance(item, (list, tuple)):
        for i, f in enumerate(item):
            if isinstance(f, Image.Image):
                check_image_size(*f.size, f"(frame {i})", kind="video")
            elif isinstance(f, np.ndarray) and f.ndim in (2, 3):
                check_image_size(f.shape[1], f.shape[0], f"(frame {i})", kind="video")


def check_audio(item: Any) -> None:
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            return
        try:
            import soundfile as sf

            rate = sf.info(str(item)).samplerate
        except Exception:  # not audio: the loader says so
            return
        _check_rate(rate, f"'{item}'")
        return
    if isinstance(item, Audio):
        wave, rate, name = item.array, item.sample_rate, "Audio"
    elif isinstance(item, tuple) and len(item) == 2:
        wave, rate, name = item[0], item[1], "(array, sample_rate)"
    else:
        wave, rate, name = item, None, describe(item)
    if rate is not None:
        _check_rate(rate, name)
    shape = tuple(getattr(wave, "shape", ()))
    if len(shape) == 2:
        channels, samples = min(shape), max(shape)
        if channels > MAX_AUDIO_CHANNELS or samples < MIN_AUDIO_SAMPLES or channels == samples:
            raise MediaError(f"cannot read audio {name}: a 2-D array of shape {shape} has no clear layout; pass a "
                             f"1-D mono waveform, or (channels, samples) / (samples, channels) with at most "
                             f"{MAX_AUDIO_CHANNELS} channels and at least {MIN_AUDIO_SAMPLES} samples")


def _check_rate(rate: Any, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise MediaError(f"cannot read audio {name}: the sample rate must be an integer, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"cannot read audio {name}: a sample rate of {rate} Hz is outside the "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz allowed")
