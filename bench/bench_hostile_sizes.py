"""How long anymodal takes to refuse a file that asks for too much, measured (not asserted).

Issue 24 items 7 and 8 (2026-12-06, before the fix): ``convert nextgpt`` on the fixture delta plus
one 4-byte key ``...decoder.layers.3000000.norm1.weight`` took 124-180 s and 4-5 GB, then a
MemoryError traceback; a LLaVA ``config.json`` with 1e6 layers took 132 s and 5.3 GB. Each case
here runs the CLI on a tiny fixture with one hostile size and records the exit code, the wall time
and the error line. The process's peak RSS after all cases is recorded too.

    python bench/bench_hostile_sizes.py            # writes bench/results/hostile-sizes.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny fixtures the tests build
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anymodal.cli import main  # noqa: E402


def run(argv: list[str]) -> dict:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("anymodal ")]
    return {"exit": rc, "seconds": round(time.perf_counter() - start, 3), "error": lines[-1][:300] if lines else ""}


def main_bench() -> None:
    from anymodal.convert.nextgpt import load_delta
    from test_hf_systems import llava_dir
    from test_nextgpt import FIX, _vicuna

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    cases = {}
    state = dict(load_delta(FIX / "pytorch_model.pt"))
    state["gen_text_hidden_fcs.0.tfm.decoder.layers.3000000.norm1.weight"] = torch.zeros(1)
    torch.save(state, tmp / "big.pt")
    cases["convert: delta + layers.3000000 key"] = run(
        ["convert", "nextgpt", str(tmp / "big.pt"), "--llm", str(_vicuna(tmp)), "--out", str(tmp / "o"), "--no-progress"])

    factory = type("Factory", (), {"mktemp": lambda self, name: Path(tempfile.mkdtemp())})()
    llava = llava_dir.__wrapped__(factory)
    for section, field, value in (("text_config", "num_hidden_layers", 1_000_000),
                                  ("text_config", "vocab_size", 2_000_000_000),
                                  ("vision_config", "image_size", 4_000_000),
                                  ("text_config", "num_hidden_layers", 1000),
                                  ("text_config", "vocab_size", 1_000_000),
                                  ("vision_config", "image_size", 1024)):
        d = tmp / f"{field}-{value}"
        shutil.copytree(llava, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[section][field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        cases[f"LLaVA config.json {section}.{field}={value}"] = run(
            ["generate", "hi", "--model", str(d), "--out", str(tmp / "g")])
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "torch_threads": 1, "cases": cases,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    out = ROOT / "bench" / "results" / "hostile-sizes.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_bench()
