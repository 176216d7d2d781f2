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
def add_model_args(p: argparse.ArgumentParser, device_note: str = "") -> None:
    """``--model`` or ``--config``, ``--device`` and ``--allow-pickle``: what :func:`load_pipeline` reads."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a saved pipeline directory, or a LLaVA / BLIP-2 / InstructBLIP checkpoint folder "
                                     "(default: the model shipped with anymodal)")
    src.add_argument("--config", help="a YAML config file or a shipped config name (see `anymodal configs`)")
    from .utils import DEVICE_HELP

    p.add_argument("--device", default="cpu", metavar="DEVICE", help=DEVICE_HELP + device_note)
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle weights (pytorch_model.bin, ...): UNSAFE, pickle files can run code; "
                        "only for files you trust (default: safetensors only)")


def load_pipeline(model: str | None, config: str | None, device: str | None, **options):
    """``options``: what :meth:`AnyModalPipeline.from_pretrained` takes besides the source and device
    (``text_only``, ``torch_dtype``)."""
    from .pipeline import AnyModalPipeline
    from .utils import check_device

    device = check_device(device)  # a GPU that is not there: one line, before anything loads
    if config is not None:
        return AnyModalPipeline.from_pretrained(config, device=device, **options)
    return AnyModalPipeline.from_pretrained(model, device=device, **options)


OUT_RULE = ("files are named text.txt, image_0.png, audio_0.wav, video_0.gif...; a name already taken in the "
            "directory gets -1, -2... (text-1.txt) unless --overwrite")


def write_outputs(out, index: int, directory: Path, stem: str = "", video_format: str = "gif",
                  fps: int = 8, overwrite: bool = False) -> dict[str, list[str]]:
    """Write prompt ``index`` of an ``AnyModalOutput`` to files named ``[stem_]text.txt``,
    ``[stem_]image_0.png``...; a name already taken gets ``-1``, ``-2``... (never overwriting a file)
    unless ``overwrite``, which replaces the file of the same name. Return their paths by kind."""
    from .outputs import media_suffixes, unique_path, write_output

    prefix = f"{stem}_" if stem else ""

    def name(d: Path, s: str, suffix: str) -> Path:
        return d / f"{prefix}{s}{suffix}" if overwrite else unique_path(d, prefix + s, suffix)

    written = write_output(out, index, directory, name=name, suffixes=media_suffixes(video_format), fps=fps)
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
    p.add_argument("--out", required=True, help=f"directory for the text, PNG, WAV and video files; {OUT_RULE}")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same name in --out instead of writing text-1.txt, image_0-1.png...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens the LLM may generate (default: the model's llm.max_new_tokens)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps for every generated medium (default: each generator's settings)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for every generated medium (default: each generator's settings)")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif",
                   help="file type of generated videos (default gif; mp4 needs imageio-ffmpeg)")
    p.add_argument("--text-only", action="store_true",
                   help="load no generators: text out only (signal blocks stay placeholders in the text)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the LLM and generators (default: as the model is configured)")


def check_out_dir(out: str | Path) -> Path:
    """``--out`` must be a directory or a path one can be made at: checked before the model loads, so
    a typo costs no generation."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not out.exists() and not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is a file, not a directory")
    return out


def generate_command(args: argparse.Namespace) -> int:
    from .modality import media_modalities

    out_dir = check_out_dir(args.out)
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
    written = write_outputs(out, 0, out_dir, video_format=args.video_format, overwrite=args.overwrite)
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
    p.add_argument("model", nargs="?", default=None,
                   help="a saved pipeline directory, a LLaVA / BLIP-2 / InstructBLIP checkpoint folder, a YAML config "
                        "file or a shipped config name (default: the model shipped with anymodal)")


def model_config(source: str | None):
    """The :class:`AnyModalConfig` of any model argument, read from its files alone (no weights):
    ``None`` (the shipped default), a saved pipeline directory, a LLaVA / BLIP-2 / InstructBLIP
    folder, a YAML file or a shipped config name. Returns ``(config, where)``."""
    from .config import AnyModalConfig
    from .pipeline import INDEX_NAME, default_model_path, list_configs, shipped_config

    path = default_model_path() if source is None else Path(source)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            try:
                index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
                return AnyModalConfig.from_dict(index["config"]), path
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path / INDEX_NAME}: not a readable anymodal index ({e})") from None
        from .hf_systems import config_from_hf, hf_system_type

        if hf_system_type(path) is not None:
            return config_from_hf(path), path
        raise FileNotFoundError(f"{path} is not a saved anymodal pipeline (no {INDEX_NAME}) nor a LLaVA / BLIP-2 / "
                                "InstructBLIP checkpoint folder")
    if path.is_file():
        return AnyModalConfig.from_yaml(path), path
    named = shipped_config(str(source))
    if named is None:
        raise FileNotFoundError(f"{source!r} is neither a saved pipeline directory, a YAML config file, nor a shipped "
                                f"config name ({', '.join(list_configs())})")
    return AnyModalConfig.from_yaml(named), named


def info_command(args: argparse.Namespace) -> int:
    from .registry import check_component_types, load_plugins

    cfg, where = model_config(args.model)
    problems = check_component_types(cfg)
    if problems:
        raise ValueError(f"{where}: " + "\n  ".join(["unknown component types:", *problems]))
    print(cfg.to_yaml(), end="")
    plugins = load_plugins()
    if plugins:  # stderr, so that stdout stays the config as YAML
        print(f"plugins loaded: {', '.join(plugins)}", file=sys.stderr)
    return 0
