"""The ``anymodal`` command. Each subcommand is a typed function; ``main`` only parses arguments."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    """Register a subcommand: ``add_args(parser)`` declares its arguments, the function runs it."""

    def wrap(add_args):
        def deco(fn):
            COMMANDS[name] = (add_args, fn, help)
            return fn

        return deco

    return wrap


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a saved pipeline directory, or a LLaVA / BLIP-2 / InstructBLIP checkpoint folder "
                                     "(default: the model shipped with anymodal)")
    src.add_argument("--config", help="a YAML config file or a shipped config name (see `anymodal configs`)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle weights (pytorch_model.bin, ...): UNSAFE, pickle files can run code; "
                        "only for files you trust (default: safetensors only)")


def load_pipeline(model: str | None, config: str | None, device: str | None):
    from .pipeline import AnyModalPipeline

    if config is not None:
        return AnyModalPipeline.from_pretrained(config, device=device)
    return AnyModalPipeline.from_pretrained(model, device=device)


def write_outputs(out, index: int, directory: Path, stem: str = "", video_format: str = "gif",
                  fps: int = 8) -> dict[str, list[str]]:
    """Write prompt ``index`` of an ``AnyModalOutput`` to files named ``[stem_]text.txt``,
    ``[stem_]image_0.png``..., never overwriting a file; return their paths by kind."""
    from .outputs import media_suffixes, unique_path, write_output

    prefix = f"{stem}_" if stem else ""
    written = write_output(out, index, directory, name=lambda d, s, suffix: unique_path(d, prefix + s, suffix),
                           suffixes=media_suffixes(video_format), fps=fps)
    return {kind: [str(p) for p in paths] for kind, paths in written.items()}


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt; <image>/<audio>/<video> mark where input media go")
    _model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an input image (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="an input audio file (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="FILE", help="an input video file (repeatable)")
    p.add_argument("--out", required=True, help="directory for the text, PNG, WAV and video files")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps for every generated medium")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif")


@command("generate", "generate text and media for one prompt")(_generate_args)
def generate(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model, args.config, args.device)
    overrides = {}
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps
    if args.guidance is not None:
        overrides["guidance_scale"] = args.guidance
    settings = {m: dict(overrides) for m in pipe.generators} if overrides else None
    out = pipe(args.prompt, images=args.image or None, audios=args.audio or None, videos=args.video or None,
               max_new_tokens=args.max_new_tokens, settings=settings, seed=args.seed, progress=True)
    written = write_outputs(out, 0, Path(args.out), video_format=args.video_format)
    print(out.text[0])
    for kind, paths in written.items():
        for p in paths:
            print(f"{kind}: {p}")
    return 0


@command("configs", "list the configs shipped with anymodal")(lambda p: None)
def configs(args: argparse.Namespace) -> int:
    from .pipeline import list_configs, shipped_config

    for name in list_configs():
        print(f"{name}\t{shipped_config(name)}")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config file or a shipped config name")


@command("info", "validate a config (schema and component types) and print it; no weights are loaded")(_info_args)
def info(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    _load_subcommand_modules()
    parser = argparse.ArgumentParser(prog="anymodal", description="Any-to-any multimodal generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_fn=fn)
    return parser


def _load_subcommand_modules() -> None:
    """Subcommands defined in other modules register themselves on import."""
    import importlib

    for mod in ("anymodal.training.cli", "anymodal.batch", "anymodal.chat", "anymodal.ui.cli", "anymodal.toyworld.cli",
                "anymodal.toyworld.evaluate", "anymodal.convert"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise


def _quiet_loading() -> None:
    """Per-file loading bars and diffusers' notes on deprecated pipeline classes (AudioLDM and
    text-to-video, which real NExT-GPT checkpoints need) would bury the command's own output."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_loading()
    args = build_parser().parse_args(argv)
    from .loading import pickle_allowed

    try:
        with pickle_allowed(getattr(args, "allow_pickle", False)):
            return int(args._fn(args) or 0)
    except (ValueError, OSError) as e:  # bad input, or weights that cannot be found or loaded
        print(f"anymodal {args.command}: error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):  # what was being loaded, added on the way up
            print(f"  {note}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
