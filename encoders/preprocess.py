"""Media loading and transforms shared by the encoders.

Every loader accepts the forms a user is likely to hold (a file path, a PIL image, a numpy
array, an :class:`anymodal.media.Audio`, an ``(array, sample_rate)`` tuple, a list of frames,
a ``(frames, fps)`` tuple) and raises :class:`anymodal.media.MediaError` naming the item and
the reason when it cannot.

The defaults reproduce ImageBind's data pipeline (``imagebind/data.py`` at facebookresearch/
ImageBind 53680b0, with pytorchvideo 6cdc929); docs/imagebind.md lists every point and the
options that deviate from it:

- images: CLIP's mean/std, bicubic resize of the shortest side, a centre crop (torchvision's
  offset, rounded half to even);
- audio: the first channel, resampled to 16 kHz, cut into clips whose bounds are exact
  fractions truncated to samples, each clip's mean subtracted in place from the shared
  waveform, 128-bin Kaldi fbanks padded or cut to 204 frames, normalised with mean -4.268 and
  std 9.138;
- video: 2-second windows spread over the video by its frame rate, the first and last frame
  of each, the shortest side scaled bilinearly (no antialiasing), three crops (left, centre,
  right; or top, centre, bottom), offsets rounded up.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from anymodal.media import Audio, MediaError, describe, open_image_checked

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEBIND_AUDIO_MEAN = -4.268
IMAGEBIND_AUDIO_STD = 9.138

# Kaldi fbank framing used by ImageBind (and AST, where it comes from).
_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGEBIND_AUDIO_MEAN", "IMAGEBIND_AUDIO_STD",
    "load_image", "image_transform", "preprocess_images",
    "load_audio", "load_audio_channels", "resample", "clip_spans", "clip_sample_bounds", "waveform_to_fbank",
    "preprocess_audio", "AUDIO_CHANNELS", "AUDIO_DEMEAN",
    "sample_frame_indices", "clip_frame_indices", "read_video", "load_video_frames", "video_views",
    "load_video", "preprocess_videos", "VIDEO_SAMPLING", "VIDEO_CROPS",
]

AUDIO_CHANNELS = ("first", "mean")  # which samples of a multi-channel input become the clip
AUDIO_DEMEAN = ("in_place", "per_clip")  # how each clip's mean is removed (see preprocess_audio)
VIDEO_SAMPLING = ("windows", "segments")  # how frames are chosen (see preprocess_videos)
VIDEO_CROPS = (1, 3)


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def _check_file(kind: str, item: str | os.PathLike) -> Path:
    path = Path(item)
    if not path.exists():
        raise MediaError(f"cannot read {kind} '{item}': file not found")
    if path.is_dir():
        raise MediaError(f"cannot read {kind} '{item}': it is a directory")
    return path


def _check_items(items: Sequence[Any], kind: str) -> None:
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        raise TypeError(f"expected a sequence of {kind} inputs, got {type(items).__name__}; wrap a single item in a list")
    if len(items) == 0:
        raise ValueError(f"no {kind} inputs given")


# ----------------------------------------------------------------------------- images
def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    if arr.size == 0:
        raise MediaError(f"cannot read image {name}: the array is empty")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise MediaError(f"cannot read image {name}: expected (height, width, channels) but the array looks "
                         f"channels-first; transpose it to HWC")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise MediaError(f"cannot read image {name}: expected an (H, W) or (H, W, C) array with C in 1, 3 or 4, "
                         f"got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise MediaError(f"cannot read image {name}: the array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        # Float images are taken as [0, 1]; silently rescaling a 0..255 float image would hide a bug.
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise MediaError(f"cannot read image {name}: float values must lie in [0, 1], got [{lo:g}, {hi:g}]; "
                             f"pass uint8 for 0..255 data")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise MediaError(f"cannot read image {name}: unsupported array dtype {arr.dtype}; use uint8 or float in [0, 1]")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def load_image(item: Any) -> Image.Image:
    """Load one image as an RGB PIL image from a path, a PIL image or an HWC/HW numpy array."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if _is_path(item):
        return open_image_checked(_check_file("image", item), name=f"'{item}'").convert("RGB")  # size checked first
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, describe(item))
    raise MediaError(f"cannot read image {describe(item)}: unsupported input type {type(item).__name__}; "
                     f"pass a file path, a PIL image or a numpy array")


def image_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> v2.Compose:
    """PIL image -> normalised ``(3, size, size)`` float tensor: bicubic shortest-side resize, center crop."""
    return v2.Compose([
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def preprocess_images(items: Sequence[Any], size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Load and transform images into a ``(batch, 3, size, size)`` tensor."""
    _check_items(items, "image")
    transform = image_transform(size, mean, std)
    return torch.stack([transform(load_image(item)) for item in items])


# ----------------------------------------------------------------------------- audio
def _to_float_waveform(arr: Any, name: str) -> np.ndarray:
    """A float32 ``(channels, samples)`` array from a 1-D array or a 2-D array with channels on the shorter axis."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    try:
        arr = np.asarray(arr)
    except Exception as e:  # ragged lists and the like
        raise MediaError(f"cannot read audio {name}: not an array ({e})") from None
    if arr.size == 0:
        raise MediaError(f"cannot read audio {name}: the waveform is empty")
    if np.issubdtype(arr.dtype, np.integer):
        # PCM integers -> [-1, 1); unsigned PCM (8-bit wav) is centred on half its range.
        info = np.iinfo(arr.dtype)
        half = (float(info.max) + 1.0) / 2.0 if info.min == 0 else 0.0
        arr = ((arr.astype(np.float64) - half) / (float(info.max) + 1.0 - half)).astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise MediaError(f"cannot read audio {name}: unsupported dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    elif arr.ndim == 2:
        # soundfile gives (samples, channels), torchaudio (channels, samples): channels are the short axis.
        if arr.shape[0] > arr.shape[1]:
            arr = arr.T
    else:
        raise MediaError(f"cannot read audio {name}: expected a 1-D waveform or a 2-D (channels, samples) array, "
                         f"got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise MediaError(f"cannot read audio {name}: the waveform holds NaN or infinite values")
    return np.ascontiguousarray(arr)


def load_audio_channels(item: Any) -> tuple[torch.Tensor, int]:
    """Load one audio input as a float32 ``(channels, samples)`` tensor and its sample rate.

    Accepts a file path (anything libsndfile reads: wav, flac, ogg, ...), an
    :class:`anymodal.media.Audio`, or an ``(array, sample_rate)`` tuple. The tensor may share
    memory with the input: copy it before changing it in place.
    """
    if _is_path(item):
        import soundfile as sf

        path = _check_file("audio", item)
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise MediaError(f"audio file '{item}' is not audio: {e}") from None
        wave, name = data, f"'{item}'"
    elif isinstance(item, Audio):
        wave, sr, name = item.array, item.sample_rate, "Audio"
    elif isinstance(item, tuple) and len(item) == 2:
        wave, sr, name = item[0], item[1], f"(array, {item[1]!r})"
    else:
        raise MediaError(f"cannot read audio {describe(item)}: unsupported input type {type(item).__name__}; "
                         f"pass a file path, an anymodal.media.Audio or an (array, sample_rate) tuple")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise MediaError(f"cannot read audio {name}: the sample rate must be a positive integer, got {sr!r}")
    return torch.from_numpy(_to_float_waveform(wave, name)), int(sr)


def load_audio(item: Any) -> tuple[torch.Tensor, int]:
    """Load one audio input (as :func:`load_audio_channels`) as a mono ``(samples,)`` tensor: the channel mean."""
    wave, sr = load_audio_channels(item)
    return (wave[0] if wave.shape[0] == 1 else wave.mean(dim=0)), sr


def resample(wave: torch.Tensor, sample_rate: int, target_rate: int) -> torch.Tensor:
    """Resample a waveform (``(..., samples)``) with torchaudio's windowed-sinc resampler."""
    if sample_rate == target_rate:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig_freq=sample_rate, new_freq=target_rate)


def clip_spans(duration: float, clip_duration: float, num_clips: int) -> list[tuple[Fraction, Fraction]]:
    """``num_clips`` windows of ``clip_duration`` seconds with evenly spaced starts, as exact fractions.

    As pytorchvideo's ``ConstantClipsPerVideoSampler``: starts run from 0 to
    ``duration - clip_duration`` (that difference taken in floats, then made exact), in steps
    of an exact fraction; a short input gives overlapping (identical) windows.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    length = Fraction(clip_duration)
    last_start = Fraction(max(float(duration) - float(length), 0.0))
    step = last_start / max(num_clips - 1, 1)
    return [(i * step, i * step + length) for i in range(num_clips)]


def clip_sample_bounds(num_samples: int, sample_rate: int, clip_duration: float,
                       num_clips: int) -> list[tuple[int, int]]:
    """Sample ``[start, end)`` of each audio clip: :func:`clip_spans` times the rate, truncated (as ImageBind),
    the end cut at the input's length."""
    return [(int(start * sample_rate), min(int(end * sample_rate), num_samples))
            for start, end in clip_spans(num_samples / sample_rate, clip_duration, num_clips)]


def waveform_to_fbank(wave: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
                      target_length: int = 204, demean: bool = True) -> torch.Tensor:
    """ImageBind's log-mel Kaldi fbank of a mono waveform, padded or cut to ``(1, num_mel_bins, target_length)``.

    ``demean=False`` skips the subtraction of the waveform's mean, for a caller that already did it.
    """
    import torchaudio.compliance.kaldi as kaldi

    wave = wave.reshape(1, -1).float()
    if demean:
        wave = wave - wave.mean()
    min_samples = int(sample_rate * _FRAME_LENGTH_MS / 1000)
    if wave.shape[1] < min_samples:  # Kaldi needs one full window (the official code fails here); pad instead
        wave = torch.nn.functional.pad(wave, (0, min_samples - wave.shape[1]))
    fbank = kaldi.fbank(wave, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0,
                        frame_length=_FRAME_LENGTH_MS, frame_shift=_FRAME_SHIFT_MS)
    fbank = fbank.transpose(0, 1)  # (mel, frames)
    pad = target_length - fbank.shape[1]
    fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
    return fbank.unsqueeze(0)


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def preprocess_audio(items: Sequence[Any], sample_rate: int = 16000, num_mel_bins: int = 128,
                     target_length: int = 204, clip_duration: float = 2.0, num_clips: int = 3,
                     mean: float = IMAGEBIND_AUDIO_MEAN, std: float = IMAGEBIND_AUDIO_STD,
                     channel: str = "first", demean: str = "in_place") -> torch.Tensor:
    """Load audio inputs into ``(batch, num_clips, 1, num_mel_bins, target_length)`` normalised fbanks.

    Each input is resampled to ``sample_rate`` and cut into ``num_clips`` evenly spaced windows
    of ``clip_duration`` seconds (:func:`clip_sample_bounds`), as ImageBind does.

    ``channel``: ``"first"`` (ImageBind: Kaldi's fbank reads channel 0) or ``"mean"`` (mix the
    channels first). ``demean``: ``"in_place"`` (ImageBind) subtracts each clip's mean, taken
    over all its channels, from the shared waveform, so where clips overlap (inputs shorter
    than ``num_clips * clip_duration``) a later clip starts from samples an earlier one already
    shifted; ``"per_clip"`` subtracts each clip's own mean from a copy. Kaldi removes each
    frame's DC offset anyway, so the two differ only in frames that straddle an overlap's edge.
    """
    _check_items(items, "audio")
    _check_choice("channel", channel, AUDIO_CHANNELS)
    _check_choice("demean", demean, AUDIO_DEMEAN)
    out = []
    for item in items:
        wave, sr = load_audio_channels(item)
        if channel == "mean" and wave.shape[0] > 1:
            wave = wave.mean(dim=0, keepdim=True)
        # A private copy: the in-place mean subtraction must not reach the caller's array.
        wave = resample(wave, sr, sample_rate).clone()
        clips = []
        for start, end in clip_sample_bounds(wave.shape[1], sample_rate, clip_duration, num_clips):
            piece = wave[:, start:end]  # a view: "in_place" writes through to the shared waveform
            piece = piece.sub_(piece.mean()) if demean == "in_place" else piece - piece.mean()
            fbank = waveform_to_fbank(piece[0], sample_rate, num_mel_bins, target_length, demean=False)
            clips.append((fbank - mean) / std)
        out.append(torch.stack(clips))
    return torch.stack(out)


# ----------------------------------------------------------------------------- video
def sample_frame_indices(num_available: int, num_frames: int, num_clips: int = 1) -> list[int]:
    """Indices of ``num_frames`` frames: ``num_clips`` equal segments, frames spread evenly inside each.

    With ``num_clips=1`` this is a plain uniform subsample (first and last frame included).
    Short videos repeat frames rather than fail. This ignores the frame rate; ImageBind's own
    sampling is :func:`clip_frame_indices`.
    """
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if num_frames < 1 or num_clips < 1 or num_frames % num_clips:
        raise ValueError(f"num_frames ({num_frames}) must be a positive multiple of num_clips ({num_clips})")
    per_clip = num_frames // num_clips
    bounds = np.linspace(0, num_available - 1, num_clips + 1)
    indices: list[int] = []
    for c in range(num_clips):
        indices += [int(round(t)) for t in np.linspace(bounds[c], bounds[c + 1], per_clip)]
    return indices


def clip_frame_indices(num_available: int, fps: float, clip_duration: float = 2.0, num_clips: int = 5,
                       frames_per_clip: int = 2) -> list[list[int]]:
    """Frame indices of each clip, as ImageBind samples a video of ``num_available`` frames at ``fps``.

    The video lasts ``num_available / fps`` seconds; :func:`clip_spans` places ``num_clips``
    windows of ``clip_duration`` seconds over it; a window ``[start, end)`` holds the frames
    ``ceil(fps * start)`` up to, not including, ``ceil(fps * end)`` (pytorchvideo's decord
    reader); of those, ``frames_per_clip`` are taken evenly, first and last included
    (``UniformTemporalSubsample``). A video shorter than a window repeats its frames.
    """
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be positive, got {frames_per_clip}")
    fps = float(fps)
    clips = []
    for start, end in clip_spans(num_available / fps, clip_duration, num_clips):
        # float(fps) * float(start): the product pytorchvideo forms (a float times a Fraction is a float).
        first = math.ceil(fps * float(start))
        stop = min(math.ceil(fps * float(end)), num_available)
        count = stop - first
        if count < 1:
            raise ValueError(f"clip [{float(start):g} s, {float(end):g} s) of a {num_available}-frame video at "
                             f"{fps:g} fps holds no frame")
        # torch.linspace in float32, truncated: the same picks as UniformTemporalSubsample for any count.
        picks = torch.linspace(0, count - 1, frames_per_clip).clamp(0, count - 1).long().tolist()
        clips.append([first + k for k in picks])
    return clips


def _check_fps(fps: Any, name: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(fps)) or fps <= 0:
        raise MediaError(f"cannot read video {name}: the frame rate must be a positive number, got {fps!r}")
    return float(fps)


def _file_fps(meta: dict[str, Any]) -> float | None:
    """The frame rate a container reports: ffmpeg's ``fps``, or 1000 / a GIF's frame ``duration`` in ms."""
    fps = meta.get("fps")
    if isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0:
        return float(fps)
    duration = meta.get("duration")
    if meta.get("version", b"").startswith(b"GIF") and isinstance(duration, (int, float)) and duration > 0:
        return 1000.0 / float(duration)
    return None


def _decode_error(item: Any, e: Exception) -> MediaError:
    """One line for a video imageio could not read. imageio-ffmpeg's errors carry ffmpeg's whole
    stderr (3,000 characters of banner and build flags); keep what ffmpeg said about the file."""
    message = str(e)
    head, _, stderr = message.partition("=== stderr ===")
    if not stderr:
        return MediaError(f"cannot read video '{item}': not a video imageio can decode "
                          f"({type(e).__name__}: {' '.join(message.split())[:300]})")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    streams = [re.sub(r"^Stream #\S+:\s*", "", line).split(":")[0].lower()
               for line in lines if line.startswith("Stream #")]
    if any(line.startswith("Input #") for line in lines) and streams and "video" not in streams:
        return MediaError(f"cannot read video '{item}': it has no video stream (its streams: "
                          f"{', '.join(dict.fromkeys(streams))}); send a file with moving pictures")
    said = [re.sub(r"^\[[^\]]*\]\s*", "", line).rstrip(").") for line in lines
            if "rror" in line or "nvalid" in line or "not" in line.lower()]
    reason = said[0] if said else head.strip().splitlines()[0] if head.strip() else type(e).__name__
    return MediaError(f"cannot read video '{item}': not a video imageio can decode (ffmpeg: {reason[:200]})")


def _read_video_file(item: str | os.PathLike, pick: Callable[[int, float | None], list[int]]) -> list[np.ndarray]:
    path = _check_file("video", item)
    try:
        import imageio.v3 as iio
    except ImportError:
        raise MediaError(f"cannot read video '{item}': reading video files needs imageio "
                         f"(pip install imageio imageio-ffmpeg); or pass a list of frames") from None
    try:
        # Decode twice instead of holding every frame: a long video would not fit in memory.
        # The frame count comes from the container when it knows it (GIF), otherwise from a first pass.
        n = iio.improps(path, index=None).n_images
        if n is None or not math.isfinite(n):
            n = sum(1 for _ in iio.imiter(path))
        fps = _file_fps(iio.immeta(path))
    except Exception as e:  # imageio raises OSError, RuntimeError or plugin-specific errors
        raise _decode_error(item, e) from None
    if int(n) < 1:
        raise MediaError(f"cannot read video '{item}': it has no frames")
    wanted = pick(int(n), fps)
    try:
        keep, last_wanted = set(wanted), max(wanted)
        frames: dict[int, np.ndarray] = {}
        for i, frame in enumerate(iio.imiter(path)):
            if i in keep:
                frames[i] = frame
            if i >= last_wanted:
                break
    except Exception as e:  # imageio raises OSError, RuntimeError or plugin-specific errors
        raise _decode_error(item, e) from None
    if not frames:
        raise MediaError(f"cannot read video '{item}': it has no frames")
    last = frames[max(frames)]  # a container that over-reports its length: repeat the last decoded frame
    return [frames.get(i, last) for i in wanted]


def _is_frames_and_fps(item: Any) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and not isinstance(item[1], bool)
            and isinstance(item[1], (int, float, np.integer, np.floating)))


def read_video(item: Any, pick: Callable[[int, float | None], list[int]]) -> list[Image.Image]:
    """The RGB frames ``pick(num_frames, fps)`` chooses from one video, in the order it lists them.

    ``item`` is a file path (the frame rate read from the container: ffmpeg's, or a GIF's
    frame duration), a list of frames or a ``(T, H, W[, C])`` array (no frame rate: ``fps`` is
    None), or a ``(frames, fps)`` tuple of either with its rate.
    """
    fps: float | None = None
    if _is_frames_and_fps(item):
        item, fps = item[0], _check_fps(item[1], f"({describe(item[0])}, {item[1]!r})")
    if _is_path(item):
        if fps is not None:
            raise MediaError(f"cannot read video '{item}': a file carries its own frame rate; pass the path alone")
        raw: Sequence[Any] = _read_video_file(item, pick)
        name = f"'{item}'"
        chosen: Sequence[int] = range(len(raw))
    elif isinstance(item, np.ndarray):
        if item.ndim not in (3, 4) or item.shape[0] == 0:
            raise MediaError(f"cannot read video {describe(item)}: expected a non-empty (frames, H, W[, C]) array")
        raw, name = item, describe(item)
        chosen = pick(len(raw), fps)
    elif isinstance(item, (list, tuple)):
        if not item:
            raise MediaError("cannot read video []: the list of frames is empty")
        raw, name = item, f"list of {len(item)} frames"
        chosen = pick(len(raw), fps)
    else:
        raise MediaError(f"cannot read video {describe(item)}: unsupported input type {type(item).__name__}; "
                         f"pass a file path, a list of frames, a (frames, H, W, C) array or a (frames, fps) tuple")
    frames = []
    for i in chosen:
        try:
            frames.append(load_image(raw[i]))
        except MediaError as e:
            raise MediaError(f"cannot read video {name}: frame {i}: {e}") from None
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise MediaError(f"cannot read video {name}: frames differ in size {sorted(sizes)}")
    return frames


def load_video_frames(item: Any, num_frames: int, num_clips: int = 1) -> list[Image.Image]:
    """``num_frames`` RGB frames from a video in ``num_clips`` equal segments (:func:`sample_frame_indices`)."""
    return read_video(item, lambda n, fps: sample_frame_indices(n, num_frames, num_clips))


def _crop_offsets(height: int, width: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(top, left) of each crop, as pytorchvideo's ``uniform_crop``: the centre rounded up; three crops run
    along the longer side (left, centre, right; or top, centre, bottom for portrait frames)."""
    top, left = math.ceil((height - size) / 2), math.ceil((width - size) / 2)
    if crops == 1:
        return [(top, left)]
    if height > width:
        return [(0, left), (top, left), (height - size, left)]
    return [(top, 0), (top, left), (top, width - size)]


def video_views(frames: Sequence[Image.Image], num_clips: int, size: int = 224, crops: int = 3,
                mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Frames (``num_clips`` clips, one after another) -> ``(num_clips * crops, 3, frames_per_clip, size, size)``.

    As ImageBind's video transform: pixels to [0, 1], the shortest side scaled to ``size``
    (bilinear, no antialiasing; the longer side ``floor(long / short * size)``), CLIP's
    normalisation, then ``crops`` spatial crops (:func:`_crop_offsets`). Views are ordered clip
    by clip, crops inside each clip, as the official ``SpatialCrop`` lists them.
    """
    _check_choice("crops", crops, VIDEO_CROPS)
    if not frames or len(frames) % num_clips:
        raise ValueError(f"got {len(frames)} frames, expected a positive multiple of num_clips ({num_clips})")
    x = torch.stack([v2.functional.to_image(f) for f in frames])  # (T, 3, H, W) uint8
    x = x.to(torch.float32).mul_(1.0 / 255)
    h, w = x.shape[-2:]
    if w < h:
        new_h, new_w = int(math.floor(float(h) / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(float(w) / h * size))
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    x = v2.functional.normalize(x, mean=list(mean), std=list(std))
    x = x.reshape(num_clips, len(frames) // num_clips, *x.shape[1:]).transpose(1, 2)  # (clips, 3, F, H, W)
    views = [x[:, :, :, t:t + size, l:l + size] for t, l in _crop_offsets(new_h, new_w, size, crops)]
    return torch.stack(views, dim=1).flatten(0, 1).contiguous()  # (clips * crops, 3, F, size, size)


def load_video(item: Any, frames_per_clip: int = 2, num_clips: int = 5, size: int = 224, crops: int = 3,
               sampling: str = "windows", clip_duration: float = 2.0, assumed_fps: float = 8.0,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One video as ``(num_clips * crops, 3, frames_per_clip, size, size)`` normalised views.

    ``sampling="windows"`` (ImageBind) chooses frames by time (:func:`clip_frame_indices`); a
    video without a frame rate (bare frames, or a file whose container reports none) is taken
    at ``assumed_fps``. ``sampling="segments"`` cuts the frames into ``num_clips`` equal
    segments regardless of time (:func:`sample_frame_indices`).
    """
    _check_choice("sampling", sampling, VIDEO_SAMPLING)

    def pick(n: int, fps: float | None) -> list[int]:
        if sampling == "segments":
            return sample_frame_indices(n, num_clips * frames_per_clip, num_clips)
        clips = clip_frame_indices(n, assumed_fps if fps is None else fps, clip_duration, num_clips, frames_per_clip)
        return [i for clip in clips for i in clip]

    return video_views(read_video(item, pick), num_clips, size, crops, mean, std)


def preprocess_videos(items: Sequence[Any], frames_per_clip: int = 2, num_clips: int = 5, size: int = 224,
                      crops: int = 3, sampling: str = "windows", clip_duration: float = 2.0,
                      assumed_fps: float = 8.0, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Load videos into ``(batch, num_clips * crops, 3, frames_per_clip, size, size)`` (see :func:`load_video`)."""
    _check_items(items, "video")
    return torch.stack([load_video(item, frames_per_clip, num_clips, size, crops, sampling, clip_duration,
                                   assumed_fps, mean, std) for item in items])
