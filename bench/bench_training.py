"""Training throughput (samples/s) of each stage on the tiny config, with one and two processes.

    python bench/bench_training.py                      # CPU: 1 process, then 2 gloo processes
    python bench/bench_training.py --device cuda        # GPU: 1 process (2 when 2 GPUs are visible)

Each run is a real ``anymodal train`` (through ``accelerate launch`` for 2 processes) on a
generated dataset of PNG images, WAV tones and dialogues. Throughput is measured from the
per-step metrics log, leaving out the first ``--warmup`` steps, and counts the samples of all
processes together. Results go to ``bench/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_data(d: Path, rows: int) -> dict[int, Path]:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    (d / "img").mkdir(parents=True, exist_ok=True)
    (d / "aud").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    caps, dialogues = [], []
    for i in range(rows):
        c = colours[i % len(colours)]
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
        f = 220 * (1 + i % 4)
        sf.write(d / "aud" / f"{i}.wav", (0.5 * np.sin(2 * np.pi * f * np.arange(8000) / 16000)).astype(np.float32),
                 16000)
        if i % 2:
            caps.append({"modality": "image", "media": f"img/{i}.png", "caption": f"a {c} square number {i}"})
        else:
            caps.append({"modality": "audio", "media": f"aud/{i}.wav", "caption": f"a tone of {f} hz"})
        if i % 3 == 0:
            dialogues.append({"messages": [{"role": "user", "content": ["what is this? ", {"image": f"img/{i}.png"}]},
                                           {"role": "assistant", "content": f"a {c} square"}]})
        elif i % 3 == 1:
            dialogues.append({"messages": [{"role": "user", "content": f"draw a {c} square"},
                                           {"role": "assistant", "content": ["here: ", {"image": None,
                                                                                        "caption": f"a {c} square"}]}]})
        else:
            dialogues.append({"messages": [{"role": "user", "content": ["hear ", {"audio": f"aud/{i}.wav"}]},
                                           {"role": "assistant", "content": "a tone"},
                                           {"role": "user", "content": "make another"},
                                           {"role": "assistant", "content": [{"audio": None,
                                                                              "caption": f"a tone of {f} hz"}]}]})
    (d / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in caps))
    (d / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dialogues))
    return {1: d / "captions.jsonl", 2: d / "captions.jsonl", 3: d / "dialogues.jsonl"}


def run(stage: int, processes: int, data: Path, out: Path, args: argparse.Namespace) -> dict:
    threads = str(args.threads)  # BLAS pools too: numpy's feature extraction would oversubscribe the cores
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    train = ["-m", "anymodal", "train", "--stage", str(stage), "--config", str(ROOT / "configs" / "tiny.yaml"),
             "--data", str(data), "--out", str(out), "--training-config",
             str(ROOT / "configs" / "training" / "tiny.yaml"), "--max-steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--save-every", "0", "--num-workers", str(args.num_workers),
             "--no-progress"]
    if args.device == "cpu":
        train += ["--device", "cpu"]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train]
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage}, {processes} process(es) failed:\n{proc.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[args.warmup:]
    samples = sum(m["samples"] - p["samples"] for p, m in zip(metrics[args.warmup - 1:], timed)) if args.warmup \
        else metrics[-1]["samples"]
    seconds = sum((m["samples"] - p["samples"]) / m["samples_per_s"]
                  for p, m in zip(metrics[args.warmup - 1:], timed)) if args.warmup else None
    return {"stage": stage, "processes": processes, "device": args.device, "batch_size_per_process": args.batch_size,
            "steps": len(metrics), "timed_steps": len(timed), "samples_per_s": round(samples / seconds, 2),
            "loss_first": round(metrics[0]["loss"], 4), "loss_last": round(metrics[-1]["loss"], 4),
            "wall_s_including_startup": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--processes", type=int, nargs="+", default=None, help="default: 1 2 (CPU); 1, and 2 with 2 GPUs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the measurement")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "training.json")
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible")
    procs = args.processes or ([1, 2] if args.device == "cpu" or torch.cuda.device_count() >= 2 else [1])
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_data(Path(tmp) / "data", args.rows)
        for stage in args.stages:
            for n in procs:
                r = run(stage, n, files[stage], Path(tmp) / f"s{stage}-p{n}", args)
                print(json.dumps(r), flush=True)
                results.append(r)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"benchmark": "training throughput, tiny config", "device": args.device, "device_name": device,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads_per_process": args.threads,
              # the machine may be shared: other work competes with the processes measured
              "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "results": results}
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    existing = existing if isinstance(existing, dict) and "runs" in existing else {"runs": {}}
    existing["runs"][args.device] = report
    sys.path.insert(0, str(ROOT))
    from anymodal.utils import atomic_write_text

    atomic_write_text(args.out, json.dumps(existing, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
