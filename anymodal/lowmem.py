"""Memory-minded steps for real-size checkpoints (a 7B base is 13.5 GB in fp16).

* :func:`stored_dtype` reads a checkpoint's dtype from its safetensors headers (nothing loaded).
* :func:`cast_in_place` converts a loaded model to another dtype shard by shard, tensor by
  tensor: transformers maps an fp16 safetensors file and its own conversion to bf16 holds both
  the mapped source and the converted copy (2.3x the model's size, measured), whereas here each
  tensor's source pages are handed back to the kernel as soon as it is converted.
* :func:`write_safetensors` streams tensors into a safetensors file in row blocks, so that a
  converter never concatenates whole ``[vocabulary, hidden]`` matrices in memory.
* :func:`grow_token_rows` gives an LLM its added tokens' embedding rows straight from a saved rows
  file, read in slices: no random initialisation of rows that are overwritten next.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20


# ---------------------------------------------------------------------------- reading checkpoints
def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets); reads a few KB."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a complete safetensors file (its header does not read)")
        return header


def weight_shards(folder: str | os.PathLike) -> dict[str, list[str]]:
    """A transformers folder's safetensors files and the tensor names in each, in file order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(file, []).append(name)
        return dict(sorted(shards.items()))
    single = folder / "model.safetensors"
    if single.is_file():
        return {single.name: [k for k in safetensors_header(single) if k != "__metadata__"]}
    return {}


def stored_dtype(source: str | os.PathLike | None) -> torch.dtype | None:
    """The floating dtype a local safetensors checkpoint is stored in (its first shard's largest
    tensor), or None when that cannot be read without loading (a hub id, pickle weights)."""
    if source is None or not os.path.isdir(source):
        return None
    try:
        shards = weight_shards(source)
        header = safetensors_header(Path(source) / next(iter(shards))) if shards else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the loader reports what is wrong with the files
    if header is None:
        return None
    entries = [v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    floats = [e for e in entries if SAFETENSORS_DTYPES.get(e.get("dtype"), torch.int8).is_floating_point]
    if not floats:
        return None
    largest = max(floats, key=lambda e: e["data_offsets"][1] - e["data_offsets"][0])
    return SAFETENSORS_DTYPES[largest["dtype"]]


# ---------------------------------------------------------------------------- dtype conversion
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[4] != "0":
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def release_file_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Hand the pages of ``t``'s data back to the kernel when ``t`` is a view of a mapped file (a
    safetensors checkpoint): the caller is done with it, and a mapped page stays counted against
    the process until the mapping goes. Only whole pages inside ``t`` are released, and only in a
    file mapping, where the data can always be read again from the file."""
    if not t.is_cpu or t.numel() == 0:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return
    lo = (start + _PAGE - 1) // _PAGE * _PAGE
    hi = end // _PAGE * _PAGE
    if hi > lo:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def release_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """:func:`release_file_pages` for each tensor (those that are not views of a mapped file are left alone)."""
    mappings = _file_mappings()
    for t in tensors:
        release_file_pages(t, mappings)


def cast_in_place(model: nn.Module, dtype: torch.dtype, order: Iterable[Iterable[str]] = ()) -> None:
    """Convert ``model``'s floating parameters to ``dtype`` one tensor at a time, in ``order`` (the
    checkpoint's shards: a shard's mapping is dropped once all its tensors are converted), each
    source's pages released as soon as it is converted. Never two full copies of the model."""
    from tqdm.auto import tqdm

    params = dict(model.named_parameters(remove_duplicate=True))
    mappings = _file_mappings()
    done: set[str] = set()
    names = [n for group in order for n in group if n in params] + list(params)
    todo = {n: p for n, p in params.items() if p.is_floating_point() and p.dtype != dtype}
    size = sum(p.numel() * p.element_size() for p in todo.values())
    # a bar only where it takes a while (a 7B model: a minute or more on a CPU)
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"to {str(dtype).split('.')[-1]}",
              disable=size < 1 << 30) as bar, torch.no_grad():
        for name in names:
            if name in done or name not in todo:
                continue
            done.add(name)
            p = todo[name]
            old = p.data
            p.data = old.to(dtype)
            release_file_pages(old, mappings)
            bar.update(old.numel() * old.element_size())
            del old


# ---------------------------------------------------------------------------- writing
def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...],
                                                                  Callable[[], Iterator[torch.Tensor]]]],
                      metadata: dict[str, str] | None = None, on_block: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file whose tensors arrive in blocks: ``entries`` are ``(name, dtype, shape,
    blocks)`` where ``blocks()`` yields contiguous pieces that make up the tensor in row-major order.
    Only one block is in memory at a time. ``on_block(nbytes)`` reports progress."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, blocks in entries:
            written = 0
            for block in blocks():
                if block.dtype != dtype:
                    raise ValueError(f"{name}: block of dtype {block.dtype}, expected {dtype}")
                data = block.contiguous().view(torch.uint8).numpy().tobytes() if block.numel() else b""
                f.write(data)
                written += len(data)
                if on_block is not None:
                    on_block(len(data))
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != want:
                raise ValueError(f"{name}: wrote {written} bytes, expected {want} for shape {tuple(shape)}")


def row_blocks(t: torch.Tensor, extra_rows: int = 0, rows: int = 4096) -> Callable[[], Iterator[torch.Tensor]]:
    """Blocks of ``rows`` rows of ``t`` followed by ``extra_rows`` zero rows (for :func:`write_safetensors`)."""
    def blocks() -> Iterator[torch.Tensor]:
        for a in range(0, t.shape[0], rows):
            yield t[a:a + rows]
        if extra_rows:
            yield t.new_zeros(extra_rows, *t.shape[1:])
    return blocks


# ---------------------------------------------------------------------------- token rows
def grow_token_rows(lm: nn.Module, vocab_size: int, rows_file: str | os.PathLike, block: int = 4096) -> None:
    """Give ``lm`` ``vocab_size`` embedding rows with the saved rows of ``rows_file`` (``token_ids``,
    ``input_rows`` and optionally ``output_rows``) written in, read ``block`` rows at a time.

    The new matrices are allocated once and filled: the base's rows are copied only where the file
    does not replace them (never when it holds every row, as NExT-GPT's delta does), rows of the
    file go in directly, and other new rows are zero. Nothing is randomly initialised.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(rows_file)
    if not path.is_file():
        raise FileNotFoundError(f"the added token rows: weights file not found: {path}")
    try:
        f_ctx = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"the added token rows: cannot read {path}: not a complete safetensors file ({e})") from None
    with f_ctx as f:
        keys = set(f.keys())
        missing = [k for k in ("token_ids", "input_rows") if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing keys {', '.join(missing)}")
        ids = f.get_tensor("token_ids")
        emb = lm.get_input_embeddings()
        hidden = emb.weight.shape[1]
        rows = max(vocab_size, emb.weight.shape[0])
        if ids.ndim != 1 or ids.is_floating_point() or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= rows)) \
                or tuple(f.get_slice("input_rows").get_shape()) != (len(ids), hidden) \
                or ("output_rows" in keys and tuple(f.get_slice("output_rows").get_shape()) != (len(ids), hidden)):
            raise ValueError(f"{path} does not fit the language model (embedding {tuple(emb.weight.shape)}, "
                             f"{len(ids)} token ids, vocabulary {vocab_size})")
        out_emb = lm.get_output_embeddings()
        tied = out_emb is not None and out_emb.weight is emb.weight
        targets = [("input_rows", emb)]
        if out_emb is not None and not tied and "output_rows" in keys:
            targets.append(("output_rows", out_emb))
        elif out_emb is not None and not tied and rows > out_emb.weight.shape[0]:
            targets.append((None, out_emb))  # grown with zero rows; nothing saved for it
        every_row = len(ids) == rows and torch.equal(ids, torch.arange(rows, dtype=ids.dtype))
        mappings = _file_mappings()
        with torch.no_grad():
            for key, module in targets:
                old = module.weight
                new = torch.empty(rows, hidden, dtype=old.dtype, device=old.device)
                if not every_row:
                    n = min(old.shape[0], rows)
                    new[:n] = old.data[:n]
                    new[n:] = 0
                if key is not None:
                    for a in range(0, len(ids), block):
                        new[ids[a:a + block]] = f.get_slice(key)[a:a + block].to(new.dtype)
                _replace_weight(module, new, old.requires_grad)
                release_file_pages(old.data, mappings)
                del old
            if tied:
                out_emb.weight = emb.weight
    _set_vocab_size(lm, rows)


def _replace_weight(module: nn.Module, weight: torch.Tensor, requires_grad: bool) -> None:
    module.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if isinstance(module, nn.Embedding):
        module.num_embeddings = weight.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features = weight.shape[0]


def _set_vocab_size(lm: nn.Module, rows: int) -> None:
    config = getattr(lm, "config", None)
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.vocab_size = rows
    if text is not config and hasattr(config, "vocab_size"):
        config.vocab_size = rows
