"""``anymodal toyworld ship``: a finished run's pipeline copied into the package as its default model.

Every component is saved in full (``save_frozen=True``), with weights stored as float16 by default
and source paths dropped, and the result must fit :data:`SHIP_LIMIT_BYTES`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..utils import atomic_write_text, check_replaceable
from .loop import atomic_dir, directory_size


SHIP_LIMIT_BYTES = 25_000_000  # 25 MB, decimal: what the package may carry as its default model


def ship(out: str | os.PathLike, dest: str | os.PathLike | None = None, limit_bytes: int = SHIP_LIMIT_BYTES,
         dtype: torch.dtype = torch.float16) -> Path:
    """Save ``out/final`` with every component copied (``save_frozen=True``) into ``dest`` (default
    :func:`anymodal.pipeline.default_model_dir`, what ``AnyModalPipeline.from_pretrained()`` loads
    with no name).

    ``dtype`` is the storage type of the floating-point weights (``torch.float16`` halves the size;
    ``torch.float32`` keeps them as trained). Loading is unchanged: every loader casts to the
    component's configured dtype (float32 by default), so the pipeline runs in float32 either way.
    The copy is made beside ``dest`` and swapped in only when its total size is within
    ``limit_bytes`` (25 MB); otherwise ``ValueError`` names the size and ``dest`` is untouched.
    Paths of the run directory are not recorded: the index's config names the components' places
    inside ``dest``.
    """
    from ..pipeline import INDEX_NAME, SAVED_NAMES, AnyModalPipeline, default_model_dir

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    final = Path(out) / "final"
    if not (final / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{final} is not a saved pipeline; run the 'stages' phase first "
                                f"(anymodal toyworld train --out {out} --phase stages)")
    dest = Path(dest) if dest is not None else default_model_dir()
    check_replaceable(dest, marker=INDEX_NAME, known=SAVED_NAMES, what="ship --to", keep=[out])  # before the load
    pipe = AnyModalPipeline.from_pretrained(final)
    c = pipe.config
    c.llm.model, c.llm.tokenizer = "llm", "processor"
    _tokenizer_fits_llm(pipe)
    for name, e in c.encoders.items():
        e.pretrained = f"encoders/{name}/model.safetensors"
    for m, g in c.generators.items():
        g.pretrained = f"generators/{m.value}"
        g.lazy = True  # a prompt loads only the generators it uses: start-up is most of a call's time

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp)
        pipe.save_pretrained(tmp, save_frozen=True)
        if dtype != torch.float32:
            cast_weights(tmp, dtype)
        _forget_source_paths(tmp)
        size = directory_size(tmp)
        if size > limit_bytes:
            raise ValueError(f"the shipped model would be {size / 1e6:.2f} MB ({size} bytes), over the limit of "
                             f"{limit_bytes / 1e6:.2f} MB; nothing was written to {dest}")

    return atomic_dir(dest, write)


def _tokenizer_fits_llm(pipe) -> None:
    """Give the tokenizer the LLM's context length as its ``model_max_length`` (runs made before the
    ``llm`` phase did this kept the tokenizer phase's 128 against the LLM's 256 positions, so
    transformers warned of "indexing errors" on every chat turn past 128 tokens that was fine)."""
    tok, limit = pipe.processor.tokenizer, pipe.context_length
    if limit is not None and (tok.model_max_length or 0) < limit:
        tok.model_max_length = limit


def _forget_source_paths(directory: Path) -> None:
    """Drop the ``_name_or_path`` that diffusers and transformers write into saved configs: in a
    shipped copy it would only record where the run lived on the machine that built it."""
    for path in directory.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def cast_weights(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every ``*.safetensors`` file under ``directory`` with its floating-point tensors stored
    as ``dtype`` (metadata kept). The Griffin-Lim vocoder's mel filterbank, a fixed analysis matrix
    rather than learned weights (131 kB), stays as it is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(Path(directory).rglob("*.safetensors")):
        if f.parent.name == "vocoder":
            continue
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, f)
