"""The ``anymodal`` command: one table of subcommands, and ``main``, which parses the arguments and runs one.

Each subcommand is two plain functions in some module of the package, ``add_args(parser)`` and
``run(args) -> int``. This module imports a subcommand's module only when that subcommand is
chosen, so ``anymodal generate`` does not import the training, toy-world or web-UI code, and
``anymodal --help`` lists every subcommand from the table alone. No module of the package imports
this one: to add a subcommand, write its two functions and add a row to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand's functions live (``module.add_args``, ``module.run``), and its one-line help."""

    module: str
    add_args: str
    run: str
    help: str

    def functions(self) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.add_args), getattr(mod, self.run)


# In the order `anymodal --help` lists them.
COMMANDS: dict[str, Subcommand] = {
    "generate": Subcommand("anymodal.commands", "generate_args", "generate_command",
                           "generate text and media for one prompt"),
    "configs": Subcommand("anymodal.commands", "configs_args", "configs_command",
                          "list the configs shipped with anymodal"),
    "info": Subcommand("anymodal.commands", "info_args", "info_command",
                       "print the config of a model (the default, a saved folder, a YAML file or a config name) as YAML, "
                       "after checking its fields and component types; no weights are loaded"),
    "train": Subcommand("anymodal.training.cli", "train_args", "train_command",
                        "train one stage (1, 2 or 3) of a pipeline under accelerate"),
    "merge-lora": Subcommand("anymodal.training.cli", "merge_lora_args", "merge_lora_command",
                             "fold a trained LoRA adapter into the LLM and save a plain pipeline"),
    "batch": Subcommand("anymodal.batch", "batch_args", "batch_command",
                        "generate for every row of a JSONL file (resumable; shards under accelerate launch)"),
    "chat": Subcommand("anymodal.chat", "chat_args", "chat_command",
                       "a multi-turn conversation in the terminal; /image, /audio attach files"),
    "serve": Subcommand("anymodal.ui.cli", "serve_args", "serve_command",
                        "a chat web UI for the model (binds to 127.0.0.1 by default)"),
    "toyworld": Subcommand("anymodal.toyworld.cli", "toyworld_args", "toyworld_command",
                           "the synthetic toy world: train its components and ship the result "
                           "(`anymodal toyworld train --help`, `anymodal toyworld ship --help`)"),
    "eval": Subcommand("anymodal.evaluation.cli", "eval_args", "eval_command",
                       "score a model on a benchmark (t2i, t2a, t2v, i2t, a2t, v2t, vqa) or on toy-world "
                       "prompts with analytic checkers (--task toyworld, the default)"),
    "convert": Subcommand("anymodal.convert", "convert_args", "convert_command",
                          "convert a released checkpoint of another system to an anymodal pipeline directory"),
}


DEBUG_HELP = "on an error, print the full traceback instead of one line"


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only those in ``commands`` (default: all) get their arguments,
    which imports their modules."""
    wanted = set(COMMANDS if commands is None else commands)
    from . import __version__

    parser = argparse.ArgumentParser(prog="anymodal", description="Any-to-any multimodal generation.")
    parser.add_argument("--version", action="version", version=f"anymodal {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        # also after the subcommand; SUPPRESS keeps a top-level --debug from being reset to False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if name in wanted:
            add_args, run = cmd.functions()
            add_args(p)
            p.set_defaults(_fn=run)
    return parser


def _quiet_loading() -> None:
    """Per-file loading bars and diffusers' notes on deprecated pipeline classes (AudioLDM and
    text-to-video, which real NExT-GPT checkpoints need) would bury the command's own output."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand: the first argument that is not a top-level option (only --debug and --help are)."""
    for arg in argv:
        if arg not in ("--debug", "-h", "--help", "--version"):
            return arg if arg in COMMANDS else None
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"anymodal: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every error it raises becomes one line on stderr (plus the notes added on
    the way up, which say what was being loaded) and exit status 2; ``--debug`` re-raises it instead,
    with its traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:argv.index("--")] if "--" in argv else "--debug" in argv
    chosen = _chosen_command(argv)
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning  # a warning is a line too, not a source listing
    try:
        # the chosen subcommand's module is imported here, and may load plugins: inside the try too
        args = build_parser([chosen] if chosen else []).parse_args(argv)
        _quiet_loading()  # after parsing: --help, --version and usage errors import no torch
        from .loading import pickle_allowed

        with pickle_allowed(getattr(args, "allow_pickle", False)):
            return int(args._fn(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"anymodal {chosen}: interrupted" if chosen else "anymodal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(error_line(chosen, e), file=sys.stderr)
        for note in getattr(e, "__notes__", ()):  # what was being loaded, added on the way up
            print(f"  {note}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


# Bad input, missing or unreadable files, and refused sizes: their message is the whole story.
# (A KeyError, IndexError or AttributeError is a check anymodal is missing: it is named as such.)
_INPUT_ERRORS = (ValueError, OSError, TypeError, MemoryError, RuntimeError)


def error_line(command: str | None, e: BaseException) -> str:
    """``anymodal CMD: error: MESSAGE``; an error of an unexpected type (a bug) also names its type
    and points to ``--debug``."""
    where = f"anymodal {command}" if command else "anymodal"
    message = " ".join(str(e).split("\n")[:1]) if isinstance(e, RecursionError) else str(e)
    if not message:
        message = type(e).__name__
    if isinstance(e, _INPUT_ERRORS) and not isinstance(e, (NotImplementedError, RecursionError)):
        return f"{where}: error: {message}"
    return (f"{where}: error: {type(e).__name__}: {message} (an internal error: rerun with --debug for the "
            "traceback, and report it)")


if __name__ == "__main__":
    sys.exit(main())
