"""``anymodal toyworld train`` (registered on import by ``anymodal.cli``)."""

from __future__ import annotations

import argparse
import os

from anymodal.cli import command


def _toyworld_args(p: argparse.ArgumentParser) -> None:
    from .train import PHASES, PRESETS

    sub = p.add_subparsers(dest="toyworld_command", required=True)
    t = sub.add_parser("train", help="train the toy world's components from scratch, phase by phase (resumable)",
                       description="Train the toy world's tokenizer and generators. Every phase checkpoints "
                                   "atomically and resumes bit-identically with --resume.")
    t.add_argument("--out", default="runs/toyworld", help="run directory (default: runs/toyworld)")
    t.add_argument("--phase", action="append", choices=PHASES, default=None, metavar="NAME",
                   help=f"a phase to run (repeatable; default: all, in order): {', '.join(PHASES)}")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop (after a checkpoint) once this much wall time has passed; resume later with --resume")
    t.add_argument("--resume", action="store_true", help="continue unfinished phases from their last checkpoint")
    t.add_argument("--preset", choices=PRESETS, default="default",
                   help="'default' (the real recipe) or 'smoke' (seconds; checks an installation)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                   help="override a setting of the preset (repeatable), e.g. image_generator.steps=2000; "
                        "resume with the same overrides")
    t.add_argument("--results", default="bench/results",
                   help="where toyworld-<phase>.json evaluation summaries go (default: bench/results)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is kinder on a shared machine)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("toyworld", "the synthetic toy world: train its components (`anymodal toyworld train --help`)")(_toyworld_args)
def toyworld_command(args: argparse.Namespace) -> int:
    import torch

    from .train import train

    if args.toyworld_command != "train":  # argparse only lets known subcommands through
        raise ValueError(f"unknown toyworld command {args.toyworld_command!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = train(args.out, phases=args.phase, config=args.preset, max_minutes=args.max_minutes,
                    resume=args.resume, results_dir=args.results, progress=not args.no_progress,
                    overrides=args.overrides)
    for r in results:
        print(r.message)
        if r.figures:
            for split, figs in r.figures.items():
                shown = ", ".join(f"{k} {v:.0%}" for k, v in figs.items() if k.endswith("_ok") or k == "ok")
                print(f"  {split}: {shown}")
    return 3 if results and results[-1].status == "stopped" else 0
