"""Fold a trained LoRA adapter (and its trainable token rows) into the LLM's weights."""

from __future__ import annotations

import os
from pathlib import Path


def merge_lora(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Load the saved pipeline ``source``, merge its adapter into the base LLM, save to ``out``.

    The result loads with ``AnyModalPipeline.from_pretrained(out)`` and has no adapter; its
    outputs match the unmerged pipeline's up to floating-point rounding.
    """
    from peft import PeftModel

    from anymodal.pipeline import INDEX_NAME, SAVED_NAMES, AnyModalPipeline
    from anymodal.utils import check_replaceable

    source, out = Path(source), Path(out)
    if not (source / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{source} is not a saved anymodal pipeline (no {INDEX_NAME})")
    if source.resolve() == out.resolve():
        raise ValueError("merge-lora: --out must differ from the source directory")
    check_replaceable(out, marker=INDEX_NAME, known=SAVED_NAMES, what="merge-lora --out", overwrite=overwrite,
                      flag="--overwrite", keep=[source])  # before the slow load
    pipe = AnyModalPipeline.from_pretrained(source)
    lm = pipe.model.language_model
    if not isinstance(lm, PeftModel):
        raise ValueError(f"{source} has no LoRA adapter to merge (its LLM was not trained with LoRA)")
    pipe.model.language_model = lm.merge_and_unload()
    pipe.config.llm.lora = None
    # A merged LLM differs from any base it came from, so it is saved in full.
    pipe.save_pretrained(out, save_frozen=pipe.config.llm.model is not None, overwrite=overwrite)
    return out
