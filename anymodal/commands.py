"""Command functions for the ``anymodal`` CLI that belong to no library module, and what all command
functions share.

A command is two plain functions, ``NAME_args(parser)`` declaring its arguments and
``NAME_command(args) -> int`` running it; ``anymodal.cli`` lists every command in one table and
imports a command's module only when that command is chosen. The commands here are ``generate``,
``configs`` and ``info``; the others live beside the code they drive (``batch``, ``chat``,
``training.cli``, ``toyworld.cli``, ``toyworld.evaluate``, ``ui.cli``, ``convert``) and take their
shared helpers from this module: :func:`add_model_args`, :func:`load_pipeline`, :func:`write_outputs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# ------------------------------------------------------------------ shared by the command functions
def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` or ``--config``, ``--device`` and ``--allow-pickle``: what :func:`load_pipeline` reads."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a saved pipeline directory, or a LLaVA / BLIP-2 / InstructBLIP checkpoint folder "
                                     "(default: the model shipped with anymodal)")
    src.add_argument("--config", help="a YAML config file or a shipped config name (see `anymodal configs`)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle weights (pytorch_model.bin, ...): UNSAFE, pickle files can run code; "
                        "only for files you trust (default: safetensors only)")


def load_pipeline(model: str | None, config: str | None, device: str | None, **options):
    """``options``: what :meth:`AnyModalPipeline.from_pretrained` takes besides the source and device
    (``text_only``, ``torch_dtype``)."""
    from .pipeline import AnyModalPipeline

    if config is not None:
        return AnyModalPipeline.from_pretrained(config, device=device, **options)
    return AnyModalPipeline.from_pretrained(model, device=device, **options)


def write_outputs(out, index: int, directory: Path, stem: str = "", video_format: str = "gif",
                  fps: int = 8) -> dict[str, list[str]]:
    """Write prompt ``index`` of an ``AnyModalOutput`` to files named ``[stem_]text.txt``,
    ``[stem_]image_0.png``..., never overwriting a file; return their paths by kind."""
    from .outputs import media_suffixes, unique_path, write_output

    prefix = f"{stem}_" if stem else ""
    written = write_output(out, index, directory, name=lambda d, s, suffix: unique_path(d, prefix + s, suffix),
                           suffixes=media_suffixes(video_format), fps=fps)
    return {kind: [str(p) for p in paths] for kind, paths in written.items()}


# ------------------------------------------------------------------ anymodal generate
def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt; <image>/<audio>/<video> mark where input media go")
    add_model_args(p)
    from .modality import media_modalities
    from .registry import load_plugins

    load_plugins()  # a plugin's modality gets its option too
    for m in media_modalities():  # --image, --audio, --video, and any registered modality's
        p.add_argument(f"--{m.value}", action="append", default=[], metavar="FILE",
                       help=f"an input {m.value} file (repeatable)")
    p.add_argument("--out", required=True, help="directory for the text, PNG, WAV and video files")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps for every generated medium")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif")
    p.add_argument("--text-only", action="store_true",
                   help="load no generators: text out only (signal blocks stay placeholders in the text)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the LLM and generators (default: as the model is configured)")


def generate_command(args: argparse.Namespace) -> int:
    from .modality import media_modalities

    pipe = load_pipeline(args.model, args.config, args.device, text_only=args.text_only, torch_dtype=args.dtype)
    overrides = {}
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps
    if args.guidance is not None:
        overrides["guidance_scale"] = args.guidance
    settings = {m: dict(overrides) for m in pipe.generators} if overrides else None
    media = {m.spec.plural: getattr(args, m.value) or None for m in media_modalities()}
    out = pipe(args.prompt, **media, max_new_tokens=args.max_new_tokens, settings=settings, seed=args.seed,
               progress=True)
    written = write_outputs(out, 0, Path(args.out), video_format=args.video_format)
    print(out.text[0])
    for kind, paths in written.items():
        for p in paths:
            print(f"{kind}: {p}")
    return 0


# ------------------------------------------------------------------ anymodal configs, anymodal info
def configs_args(p: argparse.ArgumentParser) -> None:
    """``anymodal configs`` takes no arguments."""


def configs_command(args: argparse.Namespace) -> int:
    from .pipeline import list_configs, shipped_config

    for name in list_configs():
        print(f"{name}\t{shipped_config(name)}")
    return 0


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config file or a shipped config name")


def info_command(args: argparse.Namespace) -> int:
    from .config import AnyModalConfig
    from .pipeline import shipped_config
    from .registry import check_component_types, load_plugins

    path = Path(args.config) if Path(args.config).is_file() else shipped_config(args.config)
    if path is None:
        raise FileNotFoundError(f"no config file or shipped config named {args.config!r}")
    cfg = AnyModalConfig.from_yaml(path)
    problems = check_component_types(cfg)
    if problems:
        raise ValueError(f"{path}: " + "\n  ".join(["unknown component types:", *problems]))
    print(json.dumps(cfg.to_dict(), indent=2))
    plugins = load_plugins()
    if plugins:  # stderr, so that stdout stays the config as JSON
        print(f"plugins loaded: {', '.join(plugins)}", file=sys.stderr)
    return 0
