"""Small shared helpers: atomic writes, dtype names and quiet loading of small local models."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# torch is imported where it is used, not here: media and inputs (which `anymodal --help` imports
# through the built-in modality specs) need only the file helpers of this module.
_UMASK = os.umask(0)
os.umask(_UMASK)

_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPE_NAMES)}")
    return getattr(torch, name)


def lazy_exports(package: str, exports: dict[str, str], listed: Iterable[str] = ()
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__`` for names imported on first use: ``exports``
    maps each name to the (relative) module that defines it; the value is cached on the package.
    ``listed``: further names ``__dir__`` shows (the package's ``__all__``)."""
    import importlib
    import sys

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports, *listed})

    return __getattr__, __dir__


DEVICE_HELP = ("where the model runs: cpu (default), cuda, cuda:N, mps, or auto (a CUDA GPU when torch sees one, "
               "else cpu)")


def check_device(device: "str | torch.device | None") -> str:
    """The device a command runs on, checked before anything loads: ``None`` is ``"cpu"``; ``"auto"``
    is ``"cuda"`` when torch sees a GPU, else ``"cpu"``. A device this machine lacks (``cuda`` with no
    GPU, ``cuda:3`` on a one-GPU machine) or an unknown name is a ``ValueError`` of one line."""
    import torch

    if device is None:
        return "cpu"
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU on this machine; use --device cpu "
                             "(or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             "numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no Apple GPU (MPS) on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    return str(dev)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the real suffix stays last: writers such as ffmpeg pick the format from it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# In this process, the two renames of a swap and a whole recovery each run under this lock, so a
# recovery never sees another thread's swap half done; an old copy waiting for its removal is in
# _SWAPPING and left alone.
_SWAP_LOCK = threading.RLock()
_SWAPPING: set[Path] = set()


def _old_copies(directory: Path) -> list[tuple[Path, int]]:
    """The ``.<name>.old-<pid>-<token>`` siblings of ``directory`` and their pids."""
    prefix = f".{directory.name}.old-"
    found = []
    for p in directory.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit():
            found.append((p, int(pid)))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can ask about: assume alive
    return True


def swap_dir_into_place(tmp: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Replace ``directory`` with the finished directory ``tmp`` (a sibling of it).

    The old directory is moved aside to ``.<name>.old-<pid>-<token>`` and removed only after the new
    one is in place, so a crash never leaves the destination half-written. A crash between the two
    renames leaves no ``directory`` but an intact old copy: :func:`recover_swapped_dir` (which
    readers call before reading, and which runs here first) puts it back.
    """
    tmp, directory = Path(tmp), Path(directory)
    with _SWAP_LOCK:
        recover_swapped_dir(directory)
        if not directory.exists():
            os.replace(tmp, directory)
            return
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        _SWAPPING.add(old)
        os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            os.replace(old, directory)  # the new one could not go in: the old one goes back
            _SWAPPING.discard(old)
            raise
    try:
        shutil.rmtree(old)
    finally:
        with _SWAP_LOCK:
            _SWAPPING.discard(old)


def atomic_dir(directory: str | os.PathLike, write: Callable[[Path], T], *, durable: bool = False) -> T:
    """Let ``write`` fill a new temporary directory beside ``directory`` (``.<name>.XXXX.tmp``), then
    swap it in for ``directory`` (:func:`swap_dir_into_place`); returns what ``write`` returned.

    A crash or an error leaves the old directory (or none) and never a half-written mix; the
    temporary directory is removed on error. With ``durable``, every file written is flushed to
    disk before the swap and the parent directory after it, so a power cut cannot undo it either.
    """
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise FileExistsError(f"{directory} is {'a symbolic link' if directory.is_symlink() else 'a file'}, not a "
                              "directory; anymodal never replaces it with a directory: remove it or choose another "
                              "path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        result = write(tmp)
        if durable:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with f.open("rb") as handle:
                        os.fsync(handle.fileno())
        swap_dir_into_place(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if durable:
        fsync_dir(directory.parent)
    return result


def check_replaceable(target: str | os.PathLike, *, marker: str, known: Iterable[str], what: str,
                      overwrite: bool = False, flag: str = "overwrite=True",
                      keep: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise unless writing a directory at ``target`` loses nothing the user had.

    The one rule every command that writes a directory (``convert --out``, ``save_pretrained``,
    ``ChatSession.save``, ``merge-lora --out``) follows:

    - a missing path or an empty directory is written;
    - a directory anymodal wrote itself (it holds ``marker`` and nothing but the names in ``known``)
      is replaced, as a save over an earlier save;
    - any other directory is refused unless ``overwrite`` (the message names ``flag``);
    - a file or a symbolic link is never replaced by a directory, ``overwrite`` or not;
    - a directory that is, or holds, a path in ``keep`` (the inputs the output refers to, such as
      ``--llm``) is never replaced, ``overwrite`` or not: the result would point at what it deleted.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise FileExistsError(f"{what} {target} is {kind}, not a directory; anymodal writes a directory there and "
                              "never replaces a file or a link: remove it or choose another path")
    if not target.exists():
        return
    resolved = target.resolve()
    for p in keep:
        if p is None or not os.path.exists(p):
            continue
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise ValueError(f"{what} {target} {'is' if p == resolved else 'holds'} {p}, which the output uses; "
                             "replacing it would delete it: choose another path")
    entries = sorted(e.name for e in target.iterdir())
    if not entries or overwrite:
        return
    foreign = [e for e in entries if e not in set(known)]
    if marker in entries and not foreign:
        return
    why = (f"holds files anymodal did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
           if marker in entries else f"exists and is not one anymodal wrote (no {marker})")
    raise FileExistsError(f"{what} {target} {why}; it was left as it is. Choose another path, or pass {flag} to "
                          "replace it and everything in it")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_swapped_dir(directory: str | os.PathLike) -> bool:
    """Undo a :func:`swap_dir_into_place` that a crash cut between its two renames; True if it did.

    Such a crash leaves ``.<name>.old-<pid>-<token>`` (the previous, complete directory) and no
    ``directory``; the old copy is renamed back (the newest, if several). A new directory that had not
    been renamed in yet is never trusted: its writer may have died while filling it, and the caller's
    own temp clean-up owns it. When ``directory`` exists, old copies that a crash left after the
    second rename are removed. Copies that a running process (or a thread of this one) is swapping
    are left alone.
    """
    directory = Path(directory)
    with _SWAP_LOCK:
        olds = [p for p, pid in _old_copies(directory)
                if p not in _SWAPPING and (pid == os.getpid() or not _pid_alive(pid))]
        if directory.exists():
            for p in olds:
                shutil.rmtree(p, ignore_errors=True)
            return False
        if not olds:
            return False
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest, directory)
        for p in olds:
            if p != newest:
                shutil.rmtree(p, ignore_errors=True)
        return True


# Messages diffusers logs while anymodal builds a generator pipeline that say nothing to its user: the
# deprecation notice of the pipelines anymodal wraps on purpose (AudioLDM, TextToVideoSD: NExT-GPT's
# decoders, still shipped by diffusers), and the component type check when a component is one
# anymodal provides (the toy world's Griffin-Lim vocoder in place of a HiFi-GAN).
_HARMLESS = ("will not receive bug fixes or feature updates",)
_SMALL_BYTES = 1 << 30  # loading bars only for models that take a while to load


class _DropHarmless:
    def filter(self, record: Any) -> bool:
        msg = record.getMessage()
        if any(h in msg for h in _HARMLESS):
            return False
        return not (msg.startswith("Expected types for") and "anymodal." in msg)


def small_local_dir(path: str | os.PathLike | None) -> bool:
    """A local directory under 1 GiB, which loads in moments (a hub id may mean a download: not small)."""
    if path is None or not os.path.isdir(path):
        return False
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) < _SMALL_BYTES


@contextlib.contextmanager
def quiet_loading(show_bars: bool = True) -> Iterator[None]:
    """Build or load a model without diffusers' harmless notices (see ``_HARMLESS``) and,
    with ``show_bars=False``, without diffusers' and transformers' loading bars. Everything is
    restored afterwards, so a caller's own logging and progress-bar settings are left as they were."""
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    drop = _DropHarmless()
    source = logging.getLogger("diffusers.pipelines.pipeline_utils")  # where both notices are logged
    source.addFilter(drop)
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    if not show_bars:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        source.removeFilter(drop)
        (dlog.enable_progress_bar if bars[0] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if bars[1] else tlog.disable_progress_bar)()


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap a model with peft without transformers' FutureWarning that peft's own
    ``is_gradient_checkpointing`` lookup triggers (peft's to fix; nothing a user can act on)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global CPU generator for the block and give the caller's state back after it;
    ``None`` leaves the generator alone."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
