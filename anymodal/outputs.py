"""Writing a call's outputs to files: the text, and each generated medium by its modality's spec
(``.png`` images, ``.wav`` audio, ``.gif``/``.mp4`` videos, or a registered modality's own type)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .modality import Modality
from .utils import atomic_write_text


def unique_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem.suffix``, or ``stem-1``, ``stem-2``… so that no existing file is overwritten."""
    path = directory / f"{stem}{suffix}"
    i = 1
    while path.exists():
        path = directory / f"{stem}-{i}{suffix}"
        i += 1
    return path


def media_suffixes(video_format: str | None = None) -> dict[Modality, str]:
    """The file type each generated medium is written as: its spec's default, or ``video_format``
    (``"gif"``/``"mp4"``) for video."""
    if video_format is None:
        return {}
    suffix = f".{video_format.lstrip('.')}"
    allowed = Modality.VIDEO.spec.file_suffixes
    if suffix not in allowed:
        raise ValueError(f"video format {video_format!r} is not one anymodal writes; use "
                         f"{', '.join(s[1:] for s in allowed)}")
    return {Modality.VIDEO: suffix}


def write_output(out: Any, index: int, directory: Path, *, name: Callable[[Path, str, str], Path] | None = None,
                 suffixes: dict[Modality, str] | None = None, **options: Any) -> dict[str, list[Path]]:
    """Write prompt ``index`` of an ``AnyModalOutput`` into ``directory``: ``text.txt`` and one file per
    generated medium (``image_0.png``, ``audio_0.wav``...). Every file is written atomically.

    ``name(directory, stem, suffix)`` chooses each file's path (default ``directory/stem+suffix``);
    ``suffixes`` overrides a modality's file type; ``options`` reach the savers that take them
    (``fps=8``: the frame rate of written videos).
    Returns the paths by kind (``"text"`` and each modality's name), in the order written."""
    name = name or (lambda d, stem, suffix: d / f"{stem}{suffix}")
    suffixes = suffixes or {}
    directory.mkdir(parents=True, exist_ok=True)
    text_path = name(directory, "text", ".txt")
    atomic_write_text(text_path, out.text[index] + "\n")
    written: dict[str, list[Path]] = {"text": [text_path]}
    for m, per_prompt in out.media.items():
        spec = m.spec
        kwargs = {k: v for k, v in options.items() if k in spec.save_options}
        written[m.value] = [spec.save(item, name(directory, f"{m.value}_{k}", suffixes.get(m, spec.suffix)), **kwargs)
                            for k, item in enumerate(per_prompt[index])]
    return written
