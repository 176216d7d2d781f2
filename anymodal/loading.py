"""Loading weights safely: safetensors only (pickle behind an explicit opt-in), every missing key an
error naming the file, and the sources a saved pipeline may point at checked before use.

Pickle files (``pytorch_model.bin``, ``diffusion_pytorch_model.bin``, ``*.pt``) can run code when
loaded. anymodal refuses them unless the caller passes ``allow_pickle=True`` (CLI:
``--allow-pickle``), which is unsafe for files you did not make yourself.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
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


# the safetensors file a loader (transformers, diffusers, peft) reads instead of each pickle weights file
# it knows by name; the pickle is loaded only when that file is absent
_SAFETENSORS_TWIN = {"pytorch_model.bin": ("model.safetensors", "model.safetensors.index.json"),
                     "pytorch_model.bin.index.json": ("model.safetensors.index.json", "model.safetensors"),
                     "diffusion_pytorch_model.bin": ("diffusion_pytorch_model.safetensors",
                                                     "diffusion_pytorch_model.safetensors.index.json"),
                     "adapter_model.bin": ("adapter_model.safetensors",)}
_SHARD = re.compile(r"(pytorch_model|diffusion_pytorch_model)-\d+-of-\d+\.bin")


def _pickle_used(p: Path) -> bool:
    """Whether a loader would read the pickle file ``p``: a name it knows without its safetensors
    twin beside it (a decoy ``x.safetensors`` does not count), or an unknown name with no
    safetensors beside it at all."""
    name = p.name
    if _SHARD.fullmatch(name):
        name = name.split("-", 1)[0] + ".bin"
    twins = _SAFETENSORS_TWIN.get(name)
    if twins is not None:
        return not any((p.parent / t).is_file() for t in twins)
    return not any(q.suffix == ".safetensors" for q in p.parent.iterdir())


def refuse_pickle(source: str | os.PathLike | None, what: str) -> None:
    """Raise if a loader would read pickle weights from the local directory ``source``, unless
    allowed; when allowed, each such file is first read with ``torch.load(weights_only=True)``, so
    one that holds more than tensors fails with one line naming it instead of deep inside a loader."""
    if source is None or not os.path.isdir(source):
        return
    files = [p for p in Path(source).rglob("*") if p.is_file()]
    pickles = [p for p in files if (p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
               and not p.name.startswith("training_args")]
    bad = sorted(p for p in pickles if _pickle_used(p))
    if not bad:
        return
    if allow_pickle():
        for p in bad:
            if p.suffix in PICKLE_SUFFIXES:
                torch_load_weights(p, what)
        return
    names = ", ".join(str(p.relative_to(source)) for p in bad[:3])
    raise ValueError(f"cannot load {what} from {source}: its weights are pickle files ({names}), which can run "
                     "code when loaded; convert them to safetensors, or pass allow_pickle=True (CLI: "
                     "--allow-pickle) if you trust their source")


def torch_load_weights(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` (memory-mapped where the format allows): plain tensors and
    containers only, never code. A file that holds anything else, or is not a torch file, is a
    ``ValueError`` of one line naming it."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # a pickle with objects or code, a truncated file, not a torch file at all
        why = _unreadable_why(path, e)
        raise ValueError(f"{what}: cannot read {path} as plain tensors (torch.load with weights_only=True): "
                         f"{why}") from None


def _unreadable_why(path: Path, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in anymodal's words: never torch's advice
    to retry with ``weights_only=False`` (which runs whatever the file holds)."""
    text = str(e)
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(2)
    pickled = head[:1] == b"\x80" or head == b"PK"  # a pickle (protocol 2+) or torch's zip of one
    if "Unsupported global" in text or "GLOBAL" in text or (pickled and "WeightsUnpickler" in text):
        return "it holds Python objects, not only tensors (it could run code, so it is not loaded)"
    if "WeightsUnpickler error" in text or "invalid load key" in text or "Unsupported operand" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return ("it is not a torch checkpoint (its bytes are not a tensor pickle"
                + (f": {detail[0][:80]}" if detail and "WeightsUnpickler" in text else "") + ")")
    if "weights_only" in text:
        return "it is not a plain tensor checkpoint"
    return f"{type(e).__name__}: {(text.strip().splitlines() or ['no details'])[0][:200]}"


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


def confined(root: Path, rel: Any, where: str, kind: str = "model directory", *, resolve: bool = True) -> Path:
    """``root / rel``, refusing absolute paths and any path that leaves ``root`` (``..``, and with
    ``resolve`` symlinks). The one rule for every path that a file anymodal reads names: a saved
    pipeline's index, a session's media, a released folder's weight index."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        raise ValueError(f"{where}: {rel!r} must be a relative path inside the {kind}")
    if len(rel) > 1024 or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in rel.split("/")):
        raise ValueError(f"{where}: {rel[:100]!r}... is too long for a path inside the {kind}")
    path = root / rel
    if not resolve:  # by name only: a hub snapshot's files are links into its blob store
        if ".." in Path(rel).parts:
            raise ValueError(f"{where}: {rel!r} leaves the {kind} {root}")
        return path
    base = root.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a name too long, a loop of links
        raise ValueError(f"{where}: {rel[:100]!r} is not a usable path inside the {kind} ({e.strerror or e})") from None
    if not _stays_inside(base, resolved):
        hint = (" (a component kept elsewhere is recorded as {\"kind\": \"external\"})" if kind == "model directory"
                else "")
        raise ValueError(f"{where}: {rel!r} leaves the {kind} {root}; paths in it must stay inside it{hint}")
    return path


def _stays_inside(base: Path, target: Path) -> bool:
    """``target`` (resolved) is ``base`` (resolved) or inside it. A Hugging Face cache snapshot
    (``<repo>/snapshots/<revision>/``) keeps its files as links into ``<repo>/blobs/``: those count
    as its own."""
    if target == base or base in target.parents:
        return True
    return base.parent.name == "snapshots" and target.parent == base.parent.parent / "blobs"


def check_links_inside(root: str | os.PathLike, kind: str = "model directory") -> None:
    """Raise if any symbolic link under ``root`` leads outside it (or nowhere): every file a loader
    then reads from ``root`` is one of its own, never a file elsewhere on the machine."""
    root = Path(root)
    base = root.resolve()
    for d, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(d) / name
            if p.is_symlink() and not _stays_inside(base, p.resolve()):
                raise ValueError(f"{p}: a symbolic link to {os.readlink(p)}, which leaves the {kind} {root}; "
                                 "anymodal reads only files inside it: copy the file in instead of linking it")


_OWN_CODE: tuple[str, ...] | None = None


def _raised_by_anymodal(error: BaseException) -> bool:
    """Whether ``error`` was raised by anymodal's own code (its last traceback frame is ours)."""
    global _OWN_CODE
    if _OWN_CODE is None:
        import anymodal
        import anymodal.encoders
        import anymodal.generators

        _OWN_CODE = tuple(str(Path(m.__file__).parent) + os.sep for m in (anymodal, anymodal.encoders,
                                                                          anymodal.generators))
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)


@contextlib.contextmanager
def library_errors(what: str, source: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, an error a library raises while it parses or builds from a file (its
    TypeErrors, KeyErrors, validation errors, a UnicodeDecodeError) becomes one ``ValueError``
    starting with ``what``. anymodal's own ``ValueError``s go on unchanged, and so do a
    ``MemoryError`` and an ``OSError`` (a file or hub id not found), except that an ``OSError``
    about a local directory ``source`` (diffusers' "not a valid JSON file") is wrapped too."""
    try:
        yield
    except MemoryError:
        raise
    except OSError as e:
        if source is None or not os.path.isdir(source) or _raised_by_anymodal(e):
            raise
        raise ValueError(f"{what}: {_first_line(e)}") from None
    except Exception as e:
        if isinstance(e, ValueError) and _raised_by_anymodal(e):
            raise
        raise ValueError(f"{what}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or ["no details"]
    # huggingface_hub's validation errors put the useful line last
    return (lines[-1] if "Validation error" in lines[0] and len(lines) > 1 else lines[0])[:300]


def read_json(path: str | os.PathLike, what: str, expect: type = dict) -> Any:
    """A JSON file that must hold ``expect`` (an object by default); any other content is a
    ``ValueError`` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, expect):
        raise ValueError(f"{what}: {path} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                         f"got {type(value).__name__}")
    return value


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


def check_file_fits(module: nn.Module, path: str | os.PathLike, what: str) -> None:
    """Compare a module built on the meta device (no memory) with a safetensors file's header,
    before the real module is allocated: a shape that differs, or a whole submodule (a layer) the
    file does not have, is an error naming the key. The sizes a config gives are then those of the
    weights, whatever the config asks for. (Single missing tensors are left to the load, which
    knows tensors that are saved once and shared.)"""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: {path}")
    with library_errors(f"{what}: cannot read {path}: not a complete safetensors file"):
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    present = {k.rsplit(".", 1)[0] for k in shapes}
    for k, t in module.state_dict().items():
        if k in shapes and shapes[k] != tuple(t.shape):
            raise ValueError(f"{what}: {path} does not fit the config: {k!r} is {shapes[k]} in the file, the config "
                             f"asks for {tuple(t.shape)}")
        parent = k.rsplit(".", 1)[0] if "." in k else ""
        if k not in shapes and parent and parent not in present:
            raise ValueError(f"{what}: {path} does not fit the config: it has no {parent!r}, which the config asks "
                             "for (more layers or parts than the weights hold)")


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
