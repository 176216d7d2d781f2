"""Pipeline overhead and batching, measured (not asserted).

1. End-to-end latency of ``pipe(prompt)`` (text plus one image) against the sum of the raw
   component calls it wraps: the HF ``generate`` with the same inputs and logits processors,
   and the raw diffusers pipeline with the same ``prompt_embeds``. Target: overhead <= 3%.
2. Batch-8 throughput against 8 sequential calls. Target: >= 3x.

The LLM is made to open an image block at its first step with a logits processor, so every
call runs the whole path (random weights would rarely emit a signal token by themselves).

    python bench/bench_pipeline.py                                   # tiny config, CPU
    python bench/bench_pipeline.py --config configs/bench-realsize.yaml --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from anymodal import AnyModalPipeline, Modality
from anymodal.generation import SignalSpanForcing, generate_text
from anymodal.processor import Message
from anymodal.utils import atomic_write_text


class OpenBlockFirst(LogitsProcessor):
    """Force ``token`` as the first generated token; leave later steps alone."""

    def __init__(self, token: int, prompt_length: int = 0):
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, torch.finfo(scores.dtype).min)
            scores[:, self.token] = 0.0
        return scores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, list[float]]:
    (median,), (times,) = interleaved([fn], device, repeats)
    return median, times


def interleaved(fns, device, repeats: int) -> tuple[list[float], list[list[float]]]:
    """Median time of each function, run in turn within each repeat so that all see the same
    machine load and cache state (running the LLM evicts the UNet from the CPU caches)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="diffusion steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: up to 2)")
    ap.add_argument("--out", default=None, help="JSON results file (default bench/results/pipeline-<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    device = torch.device(args.device)

    torch.manual_seed(0)
    pipe = AnyModalPipeline.from_pretrained(args.config, device=device)
    proc, lm = pipe.processor, pipe.model.language_model
    img_gen = pipe.generators[Modality.IMAGE]
    settings = {"image": {"num_inference_steps": args.steps}}
    force = OpenBlockFirst(proc.signal_ids[Modality.IMAGE][0])
    prompt = "draw a red circle on a blue background"
    n_tok = args.max_new_tokens

    def run_pipe(prompts=prompt):
        return pipe(prompts, max_new_tokens=n_tok, seed=0, settings=settings, logits_processor=[force], progress=False)

    out = run_pipe()
    assert len(out.images[0]) == 1, "the benchmark call must generate one image"

    # --- the raw component calls, with the same inputs: the prompt's embeddings (media would be
    # scattered into them) and the same logits processors
    batch = proc([proc.format([Message("user", prompt)])])
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    tok = proc.tokenizer
    procs = LogitsProcessorList([force, SignalSpanForcing(proc.signal_ids, n_tok)])
    with torch.no_grad():
        embeds = pipe.model.embed(ids)

    def run_llm():
        with torch.no_grad():
            return lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n_tok, do_sample=False,
                               logits_processor=procs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               temperature=None, top_p=None, top_k=None)

    raw_tokens = run_llm()[0].tolist()
    if raw_tokens[: len(out.token_ids[0])] != out.token_ids[0]:
        print("warning: raw generate produced different tokens from the pipeline", file=sys.stderr)
    with torch.no_grad():
        text = generate_text(pipe.model, proc, ids, mask, {}, n_tok, logits_processor=[force])
        cond = pipe.model.project_signal(Modality.IMAGE, text.signal_hidden[Modality.IMAGE])
    s = img_gen.make_settings(settings["image"])
    neg = img_gen.negative_conditioning(1)

    def run_diffusers():
        with torch.no_grad():
            return img_gen.pipeline(prompt_embeds=cond["prompt_embeds"].to(img_gen.dtype),
                                    negative_prompt_embeds=neg["prompt_embeds"], num_inference_steps=s.num_inference_steps,
                                    guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                                    generator=torch.Generator(device=device).manual_seed(0)).images

    (t_pipe, t_llm, t_diff), (pipe_times, llm_times, diff_times) = interleaved(
        [run_pipe, run_llm, run_diffusers], device, args.repeats)
    overhead = t_pipe / (t_llm + t_diff) - 1.0

    prompts = [prompt] * args.batch
    t_batch, batch_times = timed(lambda: run_pipe(prompts), device, max(1, args.repeats // 2))
    t_seq, seq_times = timed(lambda: [run_pipe() for _ in prompts], device, max(1, args.repeats // 2))
    speedup = t_seq / t_batch

    result = {
        "config": args.config, "device": str(device),
        # one prompt with one image, end to end; batch throughput; the most GPU memory allocated at any point
        "s_per_image": t_pipe, "batch_images_per_s": args.batch / t_batch,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "max_new_tokens": n_tok, "diffusion_steps": args.steps,
        "repeats": args.repeats,
        "latency": {"pipeline_s": t_pipe, "raw_generate_s": t_llm, "raw_diffusers_s": t_diff,
                    "overhead_ratio": overhead, "target_overhead_ratio": 0.03,
                    "samples": {"pipeline": pipe_times, "generate": llm_times, "diffusers": diff_times}},
        "batching": {"batch_size": args.batch, "batched_s": t_batch, "sequential_s": t_seq,
                     "throughput_speedup": speedup, "target_speedup": 3.0,
                     "samples": {"batched": batch_times, "sequential": seq_times}},
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    out_path = Path(args.out or f"bench/results/pipeline-{device.type}.json")
    atomic_write_text(out_path, json.dumps(result, indent=2))
    print(f"latency: pipeline {t_pipe*1000:.1f} ms vs raw generate {t_llm*1000:.1f} ms + raw diffusers "
          f"{t_diff*1000:.1f} ms -> overhead {overhead*100:+.1f}% (target <= 3%)")
    print(f"batch {args.batch}: {t_batch:.3f} s vs {t_seq:.3f} s sequential -> {speedup:.2f}x throughput (target >= 3x)")
    print(f"written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
