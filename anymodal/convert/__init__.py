"""Converters from other systems' released checkpoints to anymodal pipeline directories.

Each converter is a module with ``add_args(parser)`` and ``run(args) -> int``, registered in
``CONVERTERS`` under the name ``anymodal convert NAME`` uses.
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


def _convert_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in list_converters():
        mod = importlib.import_module(CONVERTERS[name])
        q = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_args(q)
        q.set_defaults(_convert=mod.run)


def _register() -> None:
    from ..cli import command

    @command("convert", "convert a released checkpoint of another system to an anymodal pipeline directory")(
        _convert_args)
    def convert(args: argparse.Namespace) -> int:
        return args._convert(args)


_register()
