"""Plugins, fuzzed (issue 24): whatever a plugin module's import or register call does (raise, exit,
fail to parse, import what is missing, register nonsense), ``load_plugins`` names and skips it, the
built-in types stay, and the other plugins still load. In process, with seeded mutations of a valid
plugin; each case has a time bound."""

from __future__ import annotations

import random
import sys
import time
import types
import warnings
from importlib.metadata import EntryPoint

import pytest

import anymodal.registry as R

VALID = '''\
from anymodal.registry import register_input_projector
import torch.nn as nn


@register_input_projector("fuzz-proj-{k}")
class FuzzProjector(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
'''
BREAKAGES = ["raise RuntimeError('boom')", "import sys; sys.exit(3)", "import sys; sys.exit('bye')", "raise SystemExit",
             "import anymodal_no_such_module", "def (:", "1/0", "raise KeyError('x')", "register_input_projector('')",
             "register_input_projector(None)(object)", "register_input_projector('linear')(nn.Module)",
             "raise MemoryError", "x = undefined_name", "raise BaseException('base')", "\x00", "import torch; torch.zzz()"]


def _mutations(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        lines = VALID.format(k=k).split("\n")
        for _ in range(rnd.randint(1, 2)):
            at = rnd.randrange(len(lines) + 1)
            op = rnd.randrange(3)
            if op == 0 and lines:
                del lines[min(at, len(lines) - 1)]
            elif op == 1:
                lines.insert(at, rnd.choice(BREAKAGES))
            else:
                lines.insert(at, "    " * rnd.randint(0, 2) + rnd.choice(BREAKAGES))
        out.append("\n".join(lines))
    return out


def _fuzz(tmp_path, monkeypatch, seed: int, n: int) -> None:
    good = tmp_path / "fuzz_good_plugin.py"
    good.write_text(VALID.format(k="good"))
    monkeypatch.syspath_prepend(str(tmp_path))
    builtins_before = set(R.INPUT_PROJECTORS.names())
    skipped = 0
    for k, source in enumerate(_mutations(seed, n)):
        name = f"fuzz_plugin_{seed}_{k}"
        (tmp_path / f"{name}.py").write_text(source)
        eps = [EntryPoint(name=f"bad{k}", value=name, group=R.ENTRY_POINT_GROUP),
               EntryPoint(name=f"good{k}", value="fuzz_good_plugin", group=R.ENTRY_POINT_GROUP)]
        monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None, _eps=eps: _eps)
        monkeypatch.setattr(R, "_PLUGINS_LOADED", [])
        monkeypatch.setattr(R, "_PLUGIN_ERRORS", {})
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = R.load_plugins(force=True)  # must not raise, whatever the plugin does
        assert time.monotonic() - start < 10, (k, source)
        assert f"good{k}" in loaded, (k, source)  # the other plugin still loads
        if f"bad{k}" not in loaded:  # a skipped plugin is named, in one warning line
            skipped += 1
            said = [str(w.message) for w in caught if f"'bad{k}'" in str(w.message)]
            assert len(said) == 1 and "failed to load and is skipped" in said[0] and "\n" not in said[0], (k, said)
            assert f"bad{k}" in R._PLUGIN_ERRORS
        assert builtins_before <= set(R.INPUT_PROJECTORS.names())  # nothing built in was lost
        sys.modules.pop(name, None)
    assert skipped >= n // 2, skipped  # the mutations do break most plugins (else this tests nothing)


def test_fuzz_plugins_fast(tmp_path, monkeypatch):
    _fuzz(tmp_path, monkeypatch, seed=0, n=60)


@pytest.mark.slow
def test_fuzz_plugins_long(tmp_path, monkeypatch):
    _fuzz(tmp_path, monkeypatch, seed=1, n=400)
