"""One CLI convention (issue 21): a fast start that imports no torch, --version, help text on every
option, one meaning of --device, split names as documented, `info` on any model, one-line errors
(exit 2) for devices and ports, and the --out naming rule with --overwrite."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from anymodal.cli import COMMANDS, build_parser, main

_FAST_START = """
import json, sys
from anymodal.cli import main
seen = {}
for argv in (["--help"], ["--version"], ["generate", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
    seen[" ".join(argv)] = [m for m in ("torch", "transformers", "diffusers", "numpy.f2py") if m in sys.modules]
print(json.dumps(seen))
"""


def test_help_and_version_import_no_torch():
    out = subprocess.run([sys.executable, "-c", _FAST_START], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"--help": [], "--version": [], "generate --help": []}


def test_version_prints_the_package_version(capsys):
    import anymodal

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"anymodal {anymodal.__version__}"
