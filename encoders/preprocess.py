"""Media loading and transforms shared by the encoders.

Every loader accepts the forms a user is likely to hold (a file path, a PIL image, a numpy
array, an :class:`anymodal.media.Audio`, an ``(array, sample_rate)`` tuple, a list of frames)
and raises :class:`anymodal.media.MediaError` naming the item and the reason when it cannot.

The defaults reproduce ImageBind's data pipeline (``imagebind/data.py``): CLIP's mean/std,
bicubic resize of the shortest side and a center crop for images; 16 kHz Kaldi fbanks with 128
mel bins padded or cut to 204 frames, normalised with mean -4.268 and std 9.138 for audio;
bilinear short-side scaling for video frames.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from anymodal.media import Audio, MediaError, describe

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
    "load_audio", "resample", "clip_spans", "waveform_to_fbank", "preprocess_audio",
    "sample_frame_indices", "load_video_frames", "load_video", "preprocess_videos",
]


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
        path = _check_file("image", item)
        try:
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here and not later in a transform
                return img.convert("RGB")
        except UnidentifiedImageError as e:
            raise MediaError(f"cannot read image '{item}': not an image file (PIL: {e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"cannot read image '{item}': {e}") from None
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
    """A mono float32 ``(samples,)`` array from a 1-D array or a 2-D array with channels on the shorter axis."""
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
    if arr.ndim == 2:
        # soundfile gives (samples, channels), torchaudio (channels, samples): channels are the short axis.
        arr = arr.mean(axis=0 if arr.shape[0] <= arr.shape[1] else 1)
    elif arr.ndim != 1:
        raise MediaError(f"cannot read audio {name}: expected a 1-D waveform or a 2-D (channels, samples) array, "
                         f"got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise MediaError(f"cannot read audio {name}: the waveform holds NaN or infinite values")
    return np.ascontiguousarray(arr)


def load_audio(item: Any) -> tuple[torch.Tensor, int]:
    """Load one audio input as a mono float32 ``(samples,)`` tensor and its sample rate.

    Accepts a file path (anything libsndfile reads: wav, flac, ogg, ...), an
    :class:`anymodal.media.Audio`, or an ``(array, sample_rate)`` tuple.
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


def resample(wave: torch.Tensor, sample_rate: int, target_rate: int) -> torch.Tensor:
    """Resample a waveform (``(..., samples)``) with torchaudio's windowed-sinc resampler."""
    if sample_rate == target_rate:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig_freq=sample_rate, new_freq=target_rate)


def clip_spans(duration: float, clip_duration: float, num_clips: int) -> list[tuple[float, float]]:
    """``num_clips`` windows of ``clip_duration`` seconds with evenly spaced starts.

    As pytorchvideo's ``ConstantClipsPerVideoSampler``: starts run from 0 to
    ``duration - clip_duration``; a short input gives overlapping (identical) windows.
    """
    last_start = max(duration - clip_duration, 0.0)
    step = last_start / max(num_clips - 1, 1)
    return [(i * step, i * step + clip_duration) for i in range(num_clips)]


def waveform_to_fbank(wave: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
                      target_length: int = 204) -> torch.Tensor:
    """ImageBind's log-mel Kaldi fbank of a mono waveform, padded or cut to ``(1, num_mel_bins, target_length)``."""
    import torchaudio.compliance.kaldi as kaldi

    wave = wave.reshape(1, -1).float()
    wave = wave - wave.mean()
    min_samples = int(sample_rate * _FRAME_LENGTH_MS / 1000)
    if wave.shape[1] < min_samples:  # Kaldi needs at least one full window
        wave = torch.nn.functional.pad(wave, (0, min_samples - wave.shape[1]))
    fbank = kaldi.fbank(wave, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0,
                        frame_length=_FRAME_LENGTH_MS, frame_shift=_FRAME_SHIFT_MS)
    fbank = fbank.transpose(0, 1)  # (mel, frames)
    pad = target_length - fbank.shape[1]
    fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
    return fbank.unsqueeze(0)


def preprocess_audio(items: Sequence[Any], sample_rate: int = 16000, num_mel_bins: int = 128,
                     target_length: int = 204, clip_duration: float = 2.0, num_clips: int = 3,
                     mean: float = IMAGEBIND_AUDIO_MEAN, std: float = IMAGEBIND_AUDIO_STD) -> torch.Tensor:
    """Load audio inputs into ``(batch, num_clips, 1, num_mel_bins, target_length)`` normalised fbanks.

    Each input is mixed to mono, resampled to ``sample_rate`` and cut into ``num_clips``
    evenly spaced windows of ``clip_duration`` seconds, as ImageBind does.
    """
    _check_items(items, "audio")
    out = []
    for item in items:
        wave, sr = load_audio(item)
        wave = resample(wave, sr, sample_rate)
        clips = []
        for start, end in clip_spans(wave.shape[0] / sample_rate, clip_duration, num_clips):
            piece = wave[int(start * sample_rate):int(end * sample_rate)]
            clips.append((waveform_to_fbank(piece, sample_rate, num_mel_bins, target_length) - mean) / std)
        out.append(torch.stack(clips))
    return torch.stack(out)


# ----------------------------------------------------------------------------- video
def sample_frame_indices(num_available: int, num_frames: int, num_clips: int = 1) -> list[int]:
    """Indices of ``num_frames`` frames: ``num_clips`` equal segments, frames spread evenly inside each.

    With ``num_clips=1`` this is a plain uniform subsample (first and last frame included).
    Short videos repeat frames rather than fail.
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


def _read_video_file(item: str | os.PathLike, num_frames: int, num_clips: int) -> list[np.ndarray]:
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
        wanted = sample_frame_indices(int(n), num_frames, num_clips)
        keep = set(wanted)
        frames: dict[int, np.ndarray] = {}
        for i, frame in enumerate(iio.imiter(path)):
            if i in keep:
                frames[i] = frame
            if i >= wanted[-1]:
                break
    except MediaError:
        raise
    except ValueError as e:
        if "at least one frame" in str(e):
            raise MediaError(f"cannot read video '{item}': it has no frames") from None
        raise MediaError(f"cannot read video '{item}': not a video imageio can decode ({e})") from None
    except Exception as e:  # imageio raises OSError, RuntimeError or plugin-specific errors
        raise MediaError(f"cannot read video '{item}': not a video imageio can decode ({type(e).__name__}: {e})") from None
    if not frames:
        raise MediaError(f"cannot read video '{item}': it has no frames")
    last = frames[max(frames)]
    return [frames.get(i, last) for i in wanted]


def load_video_frames(item: Any, num_frames: int, num_clips: int = 1) -> list[Image.Image]:
    """Sample ``num_frames`` RGB frames from a video file, a list of frames or a ``(T, H, W[, C])`` array."""
    if _is_path(item):
        raw: Sequence[Any] = _read_video_file(item, num_frames, num_clips)
        name = f"'{item}'"
        chosen = range(len(raw))
    elif isinstance(item, np.ndarray):
        if item.ndim not in (3, 4) or item.shape[0] == 0:
            raise MediaError(f"cannot read video {describe(item)}: expected a non-empty (frames, H, W[, C]) array")
        raw, name = item, describe(item)
        chosen = sample_frame_indices(len(raw), num_frames, num_clips)
    elif isinstance(item, (list, tuple)):
        if not item:
            raise MediaError("cannot read video []: the list of frames is empty")
        raw, name = item, f"list of {len(item)} frames"
        chosen = sample_frame_indices(len(raw), num_frames, num_clips)
    else:
        raise MediaError(f"cannot read video {describe(item)}: unsupported input type {type(item).__name__}; "
                         f"pass a file path, a list of frames or a (frames, H, W, C) array")
    frames = []
    for i in chosen:
        try:
            frames.append(load_image(raw[i]))
        except MediaError as e:
            raise MediaError(f"cannot read video {name}: frame {i}: {e}") from None
    return frames


def load_video(item: Any, num_frames: int, size: int = 224, num_clips: int = 1,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One video as a normalised ``(3, num_frames, size, size)`` tensor.

    Frames are scaled (bilinear, shortest side to ``size``, as pytorchvideo's ShortSideScale
    in ImageBind) and center-cropped.
    """
    frames = load_video_frames(item, num_frames, num_clips)
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise MediaError(f"cannot read video {describe(item)}: frames differ in size {sorted(sizes)}")
    x = torch.stack([v2.functional.to_dtype(v2.functional.to_image(f), torch.float32, scale=True) for f in frames])
    x = v2.functional.resize(x, [size], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
    x = v2.functional.center_crop(x, [size, size])
    x = v2.functional.normalize(x, mean=list(mean), std=list(std))
    return x.permute(1, 0, 2, 3).contiguous()  # (T, C, H, W) -> (C, T, H, W)


def preprocess_videos(items: Sequence[Any], num_frames: int, size: int = 224, num_clips: int = 1,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Load videos into a ``(batch, 3, num_frames, size, size)`` tensor."""
    _check_items(items, "video")
    return torch.stack([load_video(item, num_frames, size, num_clips, mean, std) for item in items])
