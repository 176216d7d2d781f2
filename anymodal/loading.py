"""Loading weights safely: safetensors only (pickle behind an explicit opt-in), every missing key an
error naming the file, and the sources a saved pipeline may point at checked before use.

Pickle files (``pytorch_model.bin``, ``diffusion_pytorch_model.bin``, ``*.pt``) can run code when
loaded. anymodal refuses them unless the caller passes ``allow_pickle=True`` (CLI:
``--allow-pickle``), which is unsafe for files you did not make yourself.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ALLOW_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("anymodal_allow_pickle", default=False)
# Hugging Face repo ids: "name" or "owner/name", no "..", no leading "." or "-".
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95})?")


@contextlib.contextmanager
def pickle_allowed(allow: bool) -> Iterator[None]:
    """Within the block, components may load pickle weights (``allow_pickle=True``: unsafe)."""
    token = _ALLOW_PICKLE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def allow_pickle() -> bool:
    return _ALLOW_PICKLE.get()


def refuse_pickle(source: str | os.PathLike | None, what: str) -> None:
    """Raise if the local directory ``source`` holds pickle weights and no safetensors, unless allowed."""
    if source is None or allow_pickle() or not os.path.isdir(source):
        return
    files = [p for p in Path(source).rglob("*") if p.is_file()]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES and not p.name.startswith("training_args")]
    # a pickle with no safetensors beside it is what a loader would fall back to
    bad = [p for p in pickles if not any(q.suffix == ".safetensors" for q in p.parent.iterdir())]
    if bad:
        names = ", ".join(str(p.relative_to(source)) for p in sorted(bad)[:3])
        raise ValueError(f"cannot load {what} from {source}: its weights are pickle files ({names}), which can run "
                         "code when loaded; convert them to safetensors, or pass allow_pickle=True (CLI: "
                         "--allow-pickle) if you trust their source")


def check_external(source: Any, where: str) -> str:
    """An external component source from an index: an absolute local path or a hub id, nothing relative."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: an external source must be an absolute path or a hub id, got {source!r}")
    if os.path.isabs(source):
        return source
    if ".." in source.split("/") or not _HUB_ID.fullmatch(source) or "--" in source:
        raise ValueError(f"{where}: {source!r} is neither an absolute path nor a hub id (owner/name)")
    if os.path.exists(source):  # a hub id that also names a local path would load that path instead
        raise ValueError(f"{where}: {source!r} is meant as a hub id but also names a path relative to the current "
                         f"directory ({os.getcwd()}); run from another directory")
    return source


def confined(root: Path, rel: Any, where: str) -> Path:
    """``root / rel``, refusing absolute paths and any path that leaves ``root`` (``..``, symlinks)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise ValueError(f"{where}: {rel!r} must be a relative path inside the model directory")
    path = root / rel
    base = root.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{where}: {rel!r} leaves the model directory {root}; paths in the index must stay inside "
                         "it (a component kept elsewhere is recorded as {\"kind\": \"external\"})")
    return path


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; an unreadable or truncated file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what}: cannot read {path}: not a complete safetensors file ({e})") from None


def load_safetensors_into(module: nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load a safetensors file into ``module``; every missing, unexpected or mis-shaped key is an error
    naming the file (tensors shared inside the module, saved once, count as present)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: {path}")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what}: cannot read {path}: not a complete safetensors file ({e})") from None
    except RuntimeError as e:  # shapes that do not fit
        raise ValueError(f"{what}: {path} does not fit the model: {str(e).strip()[:500]}") from None
    if missing or unexpected:
        parts = [f"{name}: {', '.join(sorted(keys)[:5])}{' ...' if len(keys) > 5 else ''}" for name, keys in
                 (("missing keys", list(missing)), ("unexpected keys", list(unexpected))) if keys]
        raise ValueError(f"{what}: {path} does not fit the model: " + "; ".join(parts))


def missing_keys_error(info: dict[str, Any], source: Any, what: str) -> None:
    """Raise if a transformers/diffusers ``loading_info`` reports weights the checkpoint lacks."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if mismatched:
            parts.append(f"shape mismatches: {', '.join(mismatched[:5])}")
        raise ValueError(f"{what} {source}: the checkpoint lacks weights the model needs ({'; '.join(parts)}); "
                         "they would be randomly initialised")
