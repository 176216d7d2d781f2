"""The ``anymodal`` command's table of subcommands: every row resolves, ``--help`` lists them all,
and choosing one imports that subcommand's module alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from anymodal.cli import COMMANDS, build_parser, main


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_every_row_of_the_table_resolves_to_two_functions():
    for name, cmd in COMMANDS.items():
        add_args, run = cmd.functions()
        assert callable(add_args) and callable(run), name
    # every subcommand gets its arguments and its function: `generate` needs a prompt and --out
    args = build_parser().parse_args(["generate", "a cat", "--out", "o"])
    assert args._fn.__name__ == "generate_command" and args.prompt == "a cat"


def test_help_lists_every_subcommand_with_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = _squash(capsys.readouterr().out)
    for name, cmd in COMMANDS.items():
        assert f" {name} {_squash(cmd.help)}" in out, name


def test_an_unknown_subcommand_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(name in err for name in COMMANDS)


_PROBE = """
import json, sys
from anymodal.cli import main
seen = {}
for argv in (["--help"], ["generate", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
    seen[" ".join(argv)] = sorted(m for m in sys.modules if m.startswith("anymodal"))
print(json.dumps(seen))
"""


def _packages(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # anymodal.ui, anymodal.ui.cli


def test_a_subcommand_imports_its_own_module_alone():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    seen = {argv: set(mods) for argv, mods in json.loads(proc.stdout.splitlines()[-1]).items()}
    table = {cmd.module for cmd in COMMANDS.values()}
    assert not seen["--help"] & table  # the help strings live in the table
    own = COMMANDS["generate"].module
    others = set().union(*(_packages(m) for m in table if m != own)) - _packages(own)
    assert own in seen["generate --help"]
    assert not seen["generate --help"] & others, sorted(seen["generate --help"] & others)
