"""Converters from other systems' released checkpoints to anymodal pipeline directories.

Each converter is a module with ``add_args(parser)`` and ``run(args) -> int``, listed in
``CONVERTERS`` under the name ``anymodal convert NAME`` uses. ``convert_args`` and
``convert_command`` are ``anymodal convert`` itself.
"""

from __future__ import annotations

import argparse
import importlib

# name -> module implementing add_args / run
CONVERTERS: dict[str, str] = {
    "nextgpt": "anymodal.convert.nextgpt",
}


def list_converters() -> list[str]:
    return sorted(CONVERTERS)


def convert_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in list_converters():
        mod = importlib.import_module(CONVERTERS[name])
        q = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_args(q)
        q.set_defaults(_convert=mod.run)


def convert_command(args: argparse.Namespace) -> int:
    return args._convert(args)
