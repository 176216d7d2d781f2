"""Media containers and loaders shared by encoders, the pipeline, batch and sessions."""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .utils import atomic_path

logger = logging.getLogger(__name__)
SAVE_PEAK = 0.99  # the peak an over-full-scale waveform is scaled to when saved


class MediaError(ValueError):
    """A medium could not be read or is of the wrong kind. The message names the source and why."""


# Limits on an image before it is decoded. 50 megapixels admits a 48/50-MP phone photo (8160 x 6120)
# and costs at most ~150 MB decoded; a decompression bomb (a 389 KB PNG of 20000 x 20000) is refused
# from its header alone. The aspect limit guards the encoders' shortest-side resize: a 1 x 50000
# strip scaled to a 224-pixel short side would become 224 x 11.2 million pixels.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_ASPECT = 20.0


def check_image_size(width: int, height: int, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_IMAGE_ASPECT, kind: str = "image") -> None:
    """Raise :class:`MediaError` if a ``width`` x ``height`` image (or ``kind``'s frame) is empty, has more
    than ``max_pixels`` pixels, or is more than ``max_aspect`` times longer than it is wide (or the reverse)."""
    if width < 1 or height < 1:
        raise MediaError(f"cannot read {kind} {name}: it is empty ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise MediaError(f"cannot read {kind} {name}: {width} x {height} = {width * height:,} pixels is more than "
                         f"the {max_pixels:,} allowed (a decompression bomb or an oversized image); scale it down")
    if max(width, height) > max_aspect * min(width, height):
        raise MediaError(f"cannot read {kind} {name}: its aspect ratio {width} x {height} is more extreme than "
                         f"{max_aspect:g}:1; crop it")


def open_image_checked(source: str | os.PathLike | bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                       max_aspect: float = MAX_IMAGE_ASPECT, name: str | None = None) -> Image.Image:
    """Open and decode an image file (a path or its bytes) only after its size passed the checks.

    The header is read first (PIL opens lazily) and the size checked with :func:`check_image_size`;
    only then are the pixels decoded, so a decompression bomb or a tiny-but-huge image costs no
    memory. Every failure is a :class:`MediaError` naming ``name`` (default: the path, or "bytes"):
    not an image, truncated, too many pixels, too extreme an aspect ratio. The image is returned
    decoded, in its own mode; ``.format`` tells what the file was (PNG, JPEG, GIF...). For an
    animated image only the first frame is decoded; every frame has the same size. PIL's own
    global limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies above ``max_pixels``.
    """
    if name is None:
        name = f"'{source}'" if isinstance(source, (str, os.PathLike)) else f"({len(source)} bytes)"
    fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # our own limit replaces PIL's: its warning (above 89 MP) is a refusal here, or no concern
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                check_image_size(img.width, img.height, name, max_pixels, max_aspect)
                if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # allowed by max_pixels
                img.load()  # decode now, so a truncated file fails here and not later
                out = img.copy()  # independent of the file, which the context manager closes
                out.format = img.format  # type: ignore[misc]
            return out
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"cannot read image {name}: file not found") from None
    except IsADirectoryError:
        raise MediaError(f"cannot read image {name}: it is a directory") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses on its own above 2 x Image.MAX_IMAGE_PIXELS (179 MP), before our check runs
        raise MediaError(f"cannot read image {name}: more than the {max_pixels:,} pixels allowed (a decompression "
                         f"bomb or an oversized image; PIL: {e})") from None
    except UnidentifiedImageError:
        raise MediaError(f"cannot read image {name}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"cannot read image {name}: {e}") from None
    except (IndexError, KeyError, TypeError, ZeroDivisionError, struct.error) as e:  # PIL decoders on crafted files
        raise MediaError(f"cannot read image {name}: a damaged or crafted file ({type(e).__name__}: {e})") from None


@dataclass
class Audio:
    """A mono waveform and its sample rate."""

    array: np.ndarray  # float32, shape (samples,)
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.array) / float(self.sample_rate)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a 16-bit PCM WAV. PCM holds [-1, 1]: a waveform whose peak is above 1 is scaled down
        to a peak of :data:`SAVE_PEAK` (with a logged warning naming the peak), never clipped; one
        with NaN or infinite samples is refused."""
        import soundfile as sf

        path = Path(path)
        data = np.asarray(self.array, dtype=np.float32)
        if not np.isfinite(data).all():
            raise MediaError(f"cannot save audio to {path}: it has NaN or infinite samples")
        peak = float(np.abs(data).max()) if data.size else 0.0
        if peak > 1.0:
            logger.warning("audio for %s peaks at %.3g, above 16-bit PCM's full scale 1.0: normalised to a peak "
                           "of %.2f instead of clipping", path.name, peak, SAVE_PEAK)
            data = data * np.float32(SAVE_PEAK / peak)
        with atomic_path(path) as tmp:
            sf.write(str(tmp), data, self.sample_rate, format="WAV", subtype="PCM_16")
        return path


# A video is a list of frames.
Video = list  # list[PIL.Image.Image]


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames as an animated GIF or an MP4 (MP4 needs imageio-ffmpeg), chosen by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not frames:
        raise ValueError("cannot save a video with no frames")
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]),
                           duration=int(1000 / fps), loop=0)
        elif suffix == ".mp4":
            import imageio.v3 as iio

            arr = np.stack([np.asarray(f.convert("RGB")) for f in frames])
            iio.imwrite(tmp, arr, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
        else:
            raise ValueError(f"unsupported video file type {suffix!r}; use .gif or .mp4")
    return path


def describe(item: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array{tuple(item.shape)}"
    return type(item).__name__


def probe_image_file(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_IMAGE_ASPECT, kind: str = "image") -> tuple[tuple[int, int], bool] | None:
    """``((width, height), animated)`` of an image file, from its header only, size-checked with
    :func:`check_image_size`; ``None`` if PIL does not recognise the file (a video container, or
    not an image: the loader says which). Nothing is decoded. Errors name the file as a ``kind``
    (``"video"`` for an animated GIF given as a video)."""
    name = f"'{path}'"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size, animated = img.size, bool(getattr(img, "is_animated", False))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"cannot read {kind} {name}: more than the {max_pixels:,} pixels allowed (a decompression "
                         f"bomb or an oversized image; PIL: {e})") from None
    except UnidentifiedImageError:
        return None
    except Exception as e:  # PIL's plugins fail on damaged files with IndexError, struct.error, EOFError, ...
        raise MediaError(f"cannot read {kind} {name}: a damaged file ({type(e).__name__}: {e})") from None
    check_image_size(size[0], size[1], name, max_pixels, max_aspect, kind)
    return size, animated


# ---------------------------------------------------------------------------- the built-in media kinds
# What ModalitySpec needs for image, audio and video (registered in anymodal.builtin, with what each
# accepts): how one medium is recognised among the accepted inputs, and how a session keeps it losslessly.


def _is_array(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported: no need to import it here
    return isinstance(x, np.ndarray) or (torch is not None and isinstance(x, torch.Tensor))


def is_image(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Image.Image)) or _is_array(x)


def is_audio(x: Any) -> bool:
    # an (array, rate) pair is one medium whatever its rate; the check (inputs.check_audio) refuses a bad rate
    return (isinstance(x, (str, os.PathLike, Audio)) or _is_array(x)
            or (isinstance(x, tuple) and len(x) == 2 and (isinstance(x[1], (int, np.integer)) or _is_array(x[0]))))


def is_video(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    if _is_array(x):
        return x.ndim == 4
    # a list of frames (PIL images or HxW[xC] arrays) is one video; a list of 4-D arrays is several
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(f, Image.Image) or (isinstance(f, np.ndarray) and f.ndim in (2, 3)) for f in x)


def save_audio(audio: Audio, path: str | os.PathLike) -> Path:
    return audio.save(path)


def keep_image(item: Any, stem: Path) -> Path:
    """Write an image losslessly as ``stem.png`` (a session's copy of a medium given as data)."""
    img = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item))
    return save_image(img, stem.with_suffix(".png"))


def restore_image(path: Path) -> Image.Image:
    if path.suffix != ".png" or not path.is_file():
        raise ValueError(f"cannot read {path}: not an image a session keeps (a .png file)")
    with Image.open(path) as im:
        return im.copy()


def keep_audio(item: Any, stem: Path) -> Path:
    """Write a waveform as a float WAV, ``stem.wav``: the reloaded waveform is bit-identical."""
    import soundfile as sf

    audio = item if isinstance(item, Audio) else (Audio(np.asarray(item[0], np.float32), int(item[1]))
                                                  if isinstance(item, tuple) else None)
    if audio is None:
        raise MediaError("cannot save a bare audio array without its sample rate; send Audio or (array, rate)")
    dst = stem.with_suffix(".wav")
    with atomic_path(dst) as tmp:
        sf.write(str(tmp), np.asarray(audio.array, np.float32), audio.sample_rate, format="WAV", subtype="FLOAT")
    return dst


def restore_audio(path: Path) -> Audio:
    import soundfile as sf

    if path.suffix == ".wav" and path.is_file() and sf.info(str(path)).subtype == "FLOAT":
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
        return Audio(np.asarray(data, np.float32), int(rate))
    raise ValueError(f"cannot read {path}: not audio a session keeps (a float .wav file)")


def keep_video(item: Any, stem: Path) -> Path:
    """Write a video's frames as PNG files in the folder ``stem``."""
    folder = stem.with_suffix("")
    folder.mkdir()
    for k, frame in enumerate(list(item)):
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        save_image(img, folder / f"frame_{k:04d}.png")
    return folder


def restore_video(path: Path) -> list[Image.Image]:
    if not path.is_dir():
        raise ValueError(f"cannot read {path}: not a video a session keeps (a folder of frames)")
    frames = []
    for f in sorted(path.glob("frame_*.png")):
        with Image.open(f) as im:
            frames.append(im.copy())
    return frames
