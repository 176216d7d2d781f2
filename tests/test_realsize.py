"""Real-size smoke test (slow; run with -m slow): the whole NExT-GPT chain on 7B-shaped random weights.

Writes the stand-ins (bench/standins.py: NExT-GPT's delta layout, a Vicuna-7B-shaped fp16 base with
only a slow SentencePiece tokenizer; ~14.3 GB), converts with the CLI, loads text-only in fp16,
generates 2 tokens and compares the ids with plain transformers + peft on the same base. Needs
~15 GB of disk and ~16 GB of free memory (the 24 GB CPU machine fits it). ANYMODAL_REALSIZE=mid
runs the same chain on a 1 GB base.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_nextgpt_7b_chain_matches_transformers_and_peft(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("writes ~14 GB of stand-ins: run it on purpose, with -m slow")
    from bench_realsize import anymodal_generate, baseline_generate
    from standins import NEXTGPT_7B, Size, write_delta, write_vicuna

    from anymodal.cli import main as cli_main

    size = NEXTGPT_7B if os.environ.get("ANYMODAL_REALSIZE", "7b") == "7b" else \
        Size(vocab=32000, hidden=2048, layers=8, heads=16, ffn=5504)
    work = Path(tempfile.mkdtemp(prefix="anymodal-realsize-test-"))
    try:
        free = shutil.disk_usage(work).free
        need = 2.2 * 2 * size.vocab * size.hidden + 2.1 * size.layers * (4 * size.hidden ** 2 + 3 * size.hidden * size.ffn)
        if free < need:
            pytest.skip(f"needs {need / 2**30:.0f} GiB of disk for the stand-ins, {free / 2**30:.0f} GiB free")
        base, delta = write_vicuna(work / "vicuna", size), write_delta(work / "pytorch_model.pt", size)
        assert not (base / "tokenizer.json").exists() and (base / "tokenizer.model").is_file()
        out = work / "out"
        assert cli_main(["convert", "nextgpt", str(delta), "--llm", str(base), "--out", str(out), "--no-progress"]) == 0
        ours = anymodal_generate(out, new_tokens=2)
        ref = baseline_generate(base, delta, out / "llm_adapter", ours["prompt_ids"], new_tokens=2)
        assert len(ours["new_ids"]) == 2 and ours["new_ids"] == ref["new_ids"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
