"""Real-size NExT-GPT on the CPU: memory and time of `convert nextgpt`, and of loading the converted
pipeline and generating, against plain transformers + peft on the same base.

    python bench/bench_realsize.py                 # NExT-GPT-7B shapes: ~14.3 GB of stand-ins
    python bench/bench_realsize.py --size mid      # a 1 GB base, same code paths, for a quick look

It writes real-shaped random stand-ins (bench/standins.py: a delta with NExT-GPT's 647 keys,
shapes and fp16 dtype; a Vicuna-7B-shaped fp16 safetensors base with only a slow SentencePiece
tokenizer), runs each step in its own process (peak RSS is the process's VmHWM; its import floor
is its RSS once the libraries are imported), deletes the stand-ins and writes
bench/results/realsize-<size>-cpu.json (7b: realsize-cpu.json).

Steps, each a fresh process, in this order (the base is read once beforehand so that every load
finds it in the page cache alike):
  convert   anymodal convert nextgpt DELTA --llm BASE --out OUT (fp16)
  baseline  AutoModelForCausalLM.from_pretrained(BASE, fp16) + resize to the delta's rows + the
            delta's embedding rows copied in + PeftModel.from_pretrained(OUT/llm_adapter); greedy
            generate of N tokens from anymodal's prompt ids
  anymodal  AnyModalPipeline.from_pretrained(OUT, text_only=True) (fp16, as converted); the same
            greedy generation through the pipeline
Targets (issue 23): convert peak above its import floor <= 1.2x the delta's size; anymodal's
load+generate peak <= 1.05x the baseline's; anymodal's load time <= 1.1x the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPT = "Tell me about the sea."
NEW_TOKENS = 2


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


# ---------------------------------------------------------------------------- the measured steps
def step_convert(work: Path) -> dict:
    from anymodal.convert.nextgpt import convert_nextgpt

    floor = _status()["VmRSS"]
    t = time.perf_counter()
    convert_nextgpt(work / "pytorch_model.pt", work / "vicuna", work / "out", dtype="float16", progress=False,
                    log=lambda *_: None)
    return {"seconds": time.perf_counter() - t, "floor": floor, **_status()}


def anymodal_generate(out: Path, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> dict:
    """Load the converted pipeline text-only and generate greedily; the prompt ids and new ids."""
    import torch

    from anymodal.pipeline import AnyModalPipeline
    from anymodal.processor import Message

    t = time.perf_counter()
    pipe = AnyModalPipeline.from_pretrained(out, text_only=True)
    loaded = time.perf_counter() - t
    proc = pipe.processor
    ids = proc([proc.format([Message("user", proc.place_media(prompt, {}))])])["input_ids"][0].tolist()
    t = time.perf_counter()
    with torch.no_grad():
        result = pipe(prompt, max_new_tokens=new_tokens, do_sample=False)
    return {"load_seconds": loaded, "generate_seconds": time.perf_counter() - t, "prompt_ids": ids,
            "new_ids": result.token_ids[0][:new_tokens]}


def baseline_generate(base: Path, delta: Path, adapter: Path, prompt_ids: list[int],
                      new_tokens: int = NEW_TOKENS) -> dict:
    """Plain transformers + peft: the base, its embeddings resized to the delta's rows and those rows
    copied in, NExT-GPT's LoRA as a peft adapter; greedy generation from the same prompt ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
    state = torch.load(str(delta), map_location="cpu", weights_only=True, mmap=True)
    embed = state["llama_model.base_model.model.model.embed_tokens.weight"]
    head = state["llama_model.base_model.model.lm_head.weight"]
    model.resize_token_embeddings(embed.shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
        model.get_output_embeddings().weight.copy_(head)
    del state, embed, head
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return {"load_seconds": loaded, "generate_seconds": time.perf_counter() - t,
            "new_ids": out[0, ids.shape[1]:].tolist()}


def step_anymodal(work: Path) -> dict:
    import anymodal.pipeline  # noqa: F401  (the import floor includes what the step imports)
    import peft  # noqa: F401

    floor = _status()["VmRSS"]
    return {**anymodal_generate(work / "out"), "floor": floor, **_status()}


def step_baseline(work: Path) -> dict:
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    floor = _status()["VmRSS"]
    ids = json.loads((work / "prompt_ids.json").read_text())
    return {**baseline_generate(work / "vicuna", work / "pytorch_model.pt", work / "out" / "llm_adapter", ids),
            "floor": floor, **_status()}


STEPS = {"convert": step_convert, "anymodal": step_anymodal, "baseline": step_baseline}


def _child(step: str, work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", step, "--work", str(work)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _warm(folder: Path) -> None:
    """Read the base once so that every process below finds it in the page cache alike."""
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["7b", "mid"], default="7b")
    ap.add_argument("--work", default=None, help="folder for the stand-ins (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the stand-ins")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(STEPS[args.child](Path(args.work))))
        return 0

    import torch

    from standins import NEXTGPT_7B, Size, write_delta, write_vicuna

    size = NEXTGPT_7B if args.size == "7b" else Size(vocab=32000, hidden=2048, layers=8, heads=16, ffn=5504)
    work = Path(args.work or tempfile.mkdtemp(prefix="anymodal-realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"size": args.size, "shapes": size.__dict__, "torch": torch.__version__,
                    "threads": os.environ.get("OMP_NUM_THREADS", "2"), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        t = time.perf_counter()
        write_vicuna(work / "vicuna", size)
        write_delta(work / "pytorch_model.pt", size)
        record["standins"] = {"seconds": time.perf_counter() - t, "base_bytes": _size(work / "vicuna"),
                              "delta_bytes": _size(work / "pytorch_model.pt")}
        print(f"stand-ins: base {record['standins']['base_bytes'] / 2**30:.2f} GiB, delta "
              f"{record['standins']['delta_bytes'] / 2**20:.0f} MiB in {record['standins']['seconds']:.0f} s",
              flush=True)
        record["convert"] = _child("convert", work)
        print("convert", record["convert"], flush=True)
        _warm(work / "vicuna")
        record["anymodal"] = _child("anymodal", work)
        print("anymodal", record["anymodal"], flush=True)
        (work / "prompt_ids.json").write_text(json.dumps(record["anymodal"]["prompt_ids"]))
        record["baseline"] = _child("baseline", work)
        print("baseline", record["baseline"], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    delta = record["standins"]["delta_bytes"]
    c, a, b = record["convert"], record["anymodal"], record["baseline"]
    record["figures"] = {
        "convert_peak_above_floor_x_delta": (c["VmHWM"] - c["floor"]) / delta,
        "load_generate_peak_x_baseline": a["VmHWM"] / b["VmHWM"],
        "load_generate_peak_above_floor_x_baseline": (a["VmHWM"] - a["floor"]) / (b["VmHWM"] - b["floor"]),
        "load_seconds_x_baseline": a["load_seconds"] / b["load_seconds"],
        "same_ids": a["new_ids"] == b["new_ids"],
    }
    record["targets"] = {"convert_peak_above_floor_x_delta": 1.2, "load_generate_peak_x_baseline": 1.05,
                         "load_seconds_x_baseline": 1.1}
    name = "realsize-cpu.json" if args.size == "7b" else f"realsize-{args.size}-cpu.json"
    out = HERE / "results" / name
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["figures"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
