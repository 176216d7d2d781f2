"""Time FAD's VGGish front end and network on this machine: a 10 s clip resampled from 44.1 and
48 kHz (resampy's kaiser_best, anymodal's NumPy implementation), its log-mel examples, and the
full-size VGGish (random weights of the released shapes) on those 10 examples.

    python bench/bench_vggish.py [--threads N] [--device cpu|cuda] [--out bench/results/vggish-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from anymodal.evaluation import vggish as V


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                     "device": args.device, "torch": torch.__version__, "seconds": {}}
    sec = results["seconds"]
    V._kaiser_best()  # the table is built once per process
    for rate in (44100, 48000):
        x = 0.1 * rng.standard_normal(10 * rate)
        sec[f"resample 10 s {rate} Hz -> 16 kHz"] = _best(lambda: V.resample(x, rate, V.SAMPLE_RATE))
    clip = 0.1 * rng.standard_normal(10 * V.SAMPLE_RATE)
    sec["log-mel examples of a 10 s 16 kHz clip"] = _best(lambda: V.waveform_to_examples(clip, V.SAMPLE_RATE))
    torch.manual_seed(0)
    net = V.VGGish().eval().to(args.device)
    examples = V.waveform_to_examples(clip, V.SAMPLE_RATE).float().to(args.device)

    def forward():
        with torch.no_grad():
            net(examples)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    forward()
    sec[f"full-size VGGish on {len(examples)} examples (one 10 s clip)"] = _best(forward)
    text = json.dumps(results, indent=1) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
