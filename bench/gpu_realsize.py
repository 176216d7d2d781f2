"""The real-size NExT-GPT chain on a CUDA GPU, in fp16 and bf16 (run by bench/gpu_check.sh).

Writes the 7B-shaped stand-ins once (bench/standins.py), converts
them with `anymodal convert nextgpt`, then for each dtype, each in its own process: loads the
converted pipeline text-only on the GPU and generates greedily, and does the same with plain
transformers + peft on the same base; records load time, generation time, peak GPU memory and
whether the ids agree. Writes bench/results/realsize-cuda.json (or --out).

    python bench/gpu_realsize.py [--dtypes float16,bfloat16] [--new-tokens 8] [--size 7b|mid]
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


def child(work: Path, who: str, dtype: str, new_tokens: int, device: str = "cuda") -> dict:
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if who == "anymodal":
        from anymodal.pipeline import AnyModalPipeline
        from anymodal.processor import Message

        pipe = AnyModalPipeline.from_pretrained(work / "out", device=device, text_only=True, torch_dtype=dtype)
        sync()
        loaded = time.perf_counter() - t
        proc = pipe.processor
        ids = proc([proc.format([Message("user", proc.place_media(PROMPT, {}))])])["input_ids"][0].tolist()
        (work / "prompt_ids.json").write_text(json.dumps(ids))
        t = time.perf_counter()
        new = pipe(PROMPT, max_new_tokens=new_tokens, do_sample=False).token_ids[0][:new_tokens]
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(work / "vicuna"), dtype=getattr(torch, dtype))
        state = torch.load(str(work / "pytorch_model.pt"), map_location="cpu", weights_only=True, mmap=True)
        embed = state["llama_model.base_model.model.model.embed_tokens.weight"]
        model.resize_token_embeddings(embed.shape[0], mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(embed)
            model.get_output_embeddings().weight.copy_(state["llama_model.base_model.model.lm_head.weight"])
        model = PeftModel.from_pretrained(model, str(work / "out" / "llm_adapter")).to(device).eval()
        sync()
        loaded = time.perf_counter() - t
        ids = torch.tensor([json.loads((work / "prompt_ids.json").read_text())], device=device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
    sync()
    return {"load_seconds": loaded, "generate_seconds": time.perf_counter() - t, "new_ids": new,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else device}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["7b", "mid"], default="7b")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "realsize-cuda.json"))
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script at --size mid")
    ap.add_argument("--child", nargs=5, metavar=("WORK", "WHO", "DTYPE", "N", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work, who, dtype, n, device = args.child
        print(json.dumps(child(Path(work), who, dtype, int(n), device)))
        return 0

    import torch

    from standins import NEXTGPT_7B, Size, write_delta, write_vicuna

    size = NEXTGPT_7B if args.size == "7b" else Size(vocab=32000, hidden=2048, layers=8, heads=16, ffn=5504)
    work = Path(tempfile.mkdtemp(prefix="anymodal-gpu-realsize-"))
    record: dict = {"size": args.size, "torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                    "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        t = time.perf_counter()
        write_vicuna(work / "vicuna", size)
        write_delta(work / "pytorch_model.pt", size)
        record["standins_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "anymodal", "convert", "nextgpt", str(work / "pytorch_model.pt"),
                             "--llm", str(work / "vicuna"), "--out", str(work / "out"), "--no-progress"]).returncode
        if rc:
            raise RuntimeError(f"convert failed with exit code {rc}")
        record["convert_seconds"] = time.perf_counter() - t
        for dtype in args.dtypes.split(","):
            row = {}
            for who in ("anymodal", "baseline"):
                proc = subprocess.run([sys.executable, __file__, "--child", str(work), who, dtype,
                                       str(args.new_tokens), args.device], capture_output=True, text=True,
                                      env=dict(os.environ, HF_HUB_OFFLINE="1"))
                if proc.returncode:
                    row[who] = {"error": proc.stderr[-2000:]}
                else:
                    row[who] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(dtype, who, row[who], flush=True)
            a, b = row["anymodal"], row["baseline"]
            if "error" not in a and "error" not in b:
                row["same_ids"] = a["new_ids"] == b["new_ids"]
                row["load_seconds_x_baseline"] = a["load_seconds"] / b["load_seconds"]
                if a["peak_gpu_bytes"]:
                    row["peak_gpu_x_baseline"] = a["peak_gpu_bytes"] / b["peak_gpu_bytes"]
            record[dtype] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
