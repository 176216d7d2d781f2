"""``anymodal toyworld train`` and ``anymodal toyworld ship``: the arguments and run function of the command."""

from __future__ import annotations

import argparse
import os
from typing import Any, Iterator


def toyworld_args(p: argparse.ArgumentParser) -> None:
    from .recipe import PRESETS
    from .runner import PHASES

    sub = p.add_subparsers(dest="toyworld_command", required=True)
    t = sub.add_parser("train", help="train the toy world's components from scratch, phase by phase (resumable)",
                       description="Train the toy world's tokenizer, generators, encoder and LLM, then the "
                                   "three anymodal stages. Every phase checkpoints atomically and resumes with "
                                   "--resume; a phase whose inputs are missing names the phase to run first.")
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
    t.add_argument("--results", default=None,
                   help="also write the toyworld-<phase>.json evaluation summaries here (e.g. bench/results to "
                        "update the repository's figures); they always go to OUT/results")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per phase (default: torch's choice; 1 is kinder on a shared machine)")
    t.add_argument("--jobs", type=int, default=1,
                   help="phases to run at once, each in its own process, once the phases they read from are "
                        "done (default 1; on 2 cores use --jobs 2 --threads 1)")
    t.add_argument("--fixed-threads", action="store_true",
                   help="with --jobs and --threads: keep every phase at --threads. By default a phase takes "
                        "the threads of one that ended when nothing can start in its place (faster; the "
                        "weights then depend on when that happened, so they repeat only to rounding)")
    t.add_argument("--device", default="cpu",
                   help="where the phases train: cpu (default; the timed recipe), cuda, cuda:N, or auto "
                        "(a CUDA GPU when torch sees one)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    u = sub.add_parser("tune", help="continue stage 3 of a finished pipeline on reworded requests and multi-turn "
                                    "sessions (resumable); the merged pipeline goes to OUT/final")
    u.add_argument("--from", dest="start", default=None,
                   help="the pipeline to start from: a saved directory (default: the shipped default model)")
    u.add_argument("--out", required=True, help="working directory (manifests, checkpoints, final/)")
    u.add_argument("--steps", type=int, default=1500, help="stage-3 steps (default 1500)")
    u.add_argument("--dialogues", type=int, default=4000, help="training dialogues to draw (default 4000)")
    u.add_argument("--rephrased", type=float, default=0.35, help="share of dialogues asked in other words (default 0.35)")
    u.add_argument("--sessions", type=float, default=0.35, help="share drawn as 3-5 turn sessions (default 0.35)")
    u.add_argument("--copies", type=float, default=0.1, help="share of text-only copy tasks (default 0.1)")
    u.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    u.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = sub.add_parser("ship", help="copy a finished run's pipeline (out/final) into the package's default model",
                       description="Save RUN_DIR/final with every component copied into DEST (default: the "
                                   "package's default model, what AnyModalPipeline.from_pretrained() loads), "
                                   "refusing a copy over 25 MB.")
    s.add_argument("--from", dest="run_dir", required=True, metavar="RUN_DIR",
                   help="a run directory of `anymodal toyworld train` whose 'stages' phase has finished")
    s.add_argument("--to", dest="dest", default=None, metavar="DEST",
                   help="destination directory (default: anymodal/assets/default inside the package)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of the weights (default float16: half the size; loading gives float32)")


def toyworld_command(args: argparse.Namespace) -> int:
    import torch

    from .runner import train

    if args.toyworld_command == "ship":
        return _ship(args)
    if args.toyworld_command == "tune":
        return _tune(args)
    if args.toyworld_command != "train":  # argparse only lets known subcommands through
        raise ValueError(f"unknown toyworld command {args.toyworld_command!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = train(args.out, phases=args.phase, config=args.preset, max_minutes=args.max_minutes,
                    resume=args.resume, results_dir=args.results, progress=not args.no_progress,
                    overrides=args.overrides, jobs=args.jobs, threads=args.threads, device=args.device,
                    share_idle_cores=not args.fixed_threads)
    for r in results:
        print(r.message)
        if r.figures:
            for split, figs in r.figures.items():
                if isinstance(figs, dict):
                    print(f"  {split}: " + ", ".join(f"{k} {v:.0%}" for k, v in _headline(figs)))
    return 3 if any(r.status == "stopped" for r in results) else 0


def _headline(figures: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The accuracies of a phase's figures: generators' ``*_ok``, the LLM's and the stages' per-task
    ``ok``/``accuracy``, the encoder's per-field ``probe``."""
    for k, v in figures.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            score = next((v[s] for s in ("ok", "accuracy", "probe") if isinstance(v.get(s), (int, float))), None)
            if score is not None:
                yield name, float(score)
            else:
                yield from _headline(v, f"{name} ")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and (k.endswith("_ok") or k == "ok"):
            yield name, float(v)


def _tune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..pipeline import default_model_dir
    from .recipe import StagesPhase
    from .stages import tune_dialogues

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = replace(StagesPhase(), rephrased=args.rephrased, sessions=args.sessions, copies=args.copies)
    final = tune_dialogues(args.start or default_model_dir(), args.out, cfg, steps=args.steps,
                           n_dialogues=args.dialogues, progress=not args.no_progress, lr=args.lr)
    print(f"tuned pipeline saved to {final}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    import torch

    from .loop import directory_size
    from .ship import ship

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dest = ship(args.run_dir, args.dest, dtype=getattr(torch, args.dtype))
    size = directory_size(dest)
    print(f"shipped {size / 1e6:.2f} MB ({size} bytes, weights in {args.dtype}) to {dest}")
    return 0
