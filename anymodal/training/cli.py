"""``anymodal train`` and ``anymodal merge-lora``: each command's arguments and its run function."""

from __future__ import annotations

import argparse
import logging

from ..utils import DEVICE_HELP, check_device


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, choices=[1, 2, 3], required=True,
                   help="1: input projectors on caption pairs; 2: output projectors + signal tokens on captions; "
                        "3: LoRA + both projectors on dialogues")
    p.add_argument("--config", required=True,
                   help="the model: a YAML config, a shipped config name, or a saved pipeline directory")
    p.add_argument("--data", required=True, help="a JSONL manifest (paths inside are relative to it)")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, final/")
    p.add_argument("--training-config", default=None, help="a training YAML (see configs/training/)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per optimiser step and process (default: the training config's)")
    p.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the training config's)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=None,
                   help="batches accumulated into one optimiser step (default: the training config's)")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (0: none)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation and data order (default: the training config's)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help=DEVICE_HELP + "; under accelerate launch, each process takes its own GPU of that type")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_command(args: argparse.Namespace) -> int:
    from .trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    flags = {"batch_size": args.batch_size, "learning_rate": args.learning_rate,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "save_every": args.save_every,
             "num_workers": args.num_workers, "seed": args.seed, "progress": False if args.no_progress else None}
    device = check_device(args.device)  # a GPU that is not there: one line, before anything loads
    result = train(args.config, args.data, args.out, args.training_config, stage=args.stage,
                   max_steps=args.max_steps, resume=args.resume, device=device,
                   **{k: v for k, v in flags.items() if v is not None})
    if result.pipeline is not None and _is_main():
        first = f"{result.losses[0]:.4f}" if result.losses else "-"
        last = f"{result.losses[-1]:.4f}" if result.losses else "-"
        print(f"stage {args.stage}: {result.steps} steps, loss {first} -> {last}, "
              f"{result.samples_per_s:.1f} samples/s, {result.bad_rows} bad rows; saved {result.final_dir}")
    return 0


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def merge_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a saved pipeline directory with a LoRA adapter (a stage-3 final/)")
    p.add_argument("--out", required=True, help="where to save the merged pipeline")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a non-empty directory that anymodal did not write")


def merge_lora_command(args: argparse.Namespace) -> int:
    from .merge import merge_lora

    out = merge_lora(args.source, args.out, overwrite=args.overwrite)
    print(f"merged pipeline saved to {out}")
    return 0
