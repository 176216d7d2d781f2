"""Docs that cannot drift (issue 21): every ```bash and ```python block of README.md and docs/*.md.

- Every block is checked: Python compiles; every ``anymodal`` command (also ``python -m anymodal``,
  ``accelerate launch ... -m anymodal``) parses with the real CLI parser, so each subcommand, flag
  and choice a doc names exists; a ``python path/to/script.py`` names a file of the repository.
- A block a user can run here is run: each file's blocks in order, in one Python namespace, in a
  fresh directory that sees the repository's ``docs/``, ``configs/`` and ``bench/``. ``anymodal``
  commands run in-process through ``anymodal.cli.main`` (exit status 0 required); other shell
  commands run in bash.
- A block that cannot run here says why on the line before it: ``<!-- needs: REASON -->`` with a
  reason from ``REASONS`` (real weights, a long run, the network, a GPU, a terminal or browser, the
  user's own data, several processes). It is still checked as above.
- ``<!-- excerpt: PATH -->`` before a Python block: every line of the block except ``...`` lines
  appears in that file (the doc shows the core of a worked example that a test runs in full).

A block in no language that starts with ``anymodal`` or ``$ anymodal`` is refused: a command a user
would copy must be in a ```bash block, where this test sees it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anymodal.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REASONS = {
    "real-weights": "needs real checkpoints on disk",
    "long-run": "takes minutes to hours",
    "network": "downloads packages",
    "gpu": "needs a CUDA GPU",
    "interactive": "a terminal chat or a server that runs until stopped",
    "your-data": "reads the user's own data files",
    "multi-process": "launches several processes",
}
RUNNABLE = {"bash", "sh", "python"}
MARK = re.compile(r"<!--\s*(needs|excerpt):\s*(.+?)\s*-->")
SHELL_SPLIT = {"&&", "||", ";", "|"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines, i = [], path.read_text(encoding="utf-8").split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        marks, k = {}, i - 1
        while k >= 0 and (MARK.search(lines[k]) or not lines[k].strip()):  # markers just above the fence
            for kind, value in MARK.findall(lines[k]):
                marks[kind] = value
            if not lines[k].strip():
                break
            k -= 1
        found.append(Block(path, i + 1, m.group(1), "\n".join(lines[i + 1:j]), marks))
        i = j + 1
    return found


ALL = [b for p in DOCS for b in blocks(p)]
CODE = [b for b in ALL if b.lang in RUNNABLE]


# ----------------------------------------------------------------------------- reading shell commands
def logical_lines(code: str) -> list[str]:
    """A shell block's lines, continuations joined, blank and comment-only lines dropped."""
    return [ln for ln in code.replace("\\\n", " ").split("\n") if ln.strip() and not ln.lstrip().startswith("#")]


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: comments dropped, split at ``&&``, ``||``, ``;``, ``|``;
    redirections and their targets dropped."""
    out = []
    for line in logical_lines(code):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        cmd: list[str] = []
        tokens = list(lexer)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in SHELL_SPLIT:
                out.append(cmd) if cmd else None
                cmd = []
            elif tok[0] in "<>":
                i += 1  # the redirection's target
            else:
                cmd.append(tok)
            i += 1
        if cmd:
            out.append(cmd)
    return out


def anymodal_argv(cmd: list[str]) -> list[str] | None:
    """The arguments given to anymodal by one command, or None if it does not run anymodal."""
    for i, tok in enumerate(cmd):
        if Path(tok).name == "anymodal" and "=" not in tok:
            return cmd[i + 1:]
        if tok == "-m" and i + 1 < len(cmd) and cmd[i + 1] == "anymodal":
            return cmd[i + 2:]
    return None


def python_script(cmd: list[str]) -> str | None:
    """``python path/x.py ...``: the script's path."""
    words = [t for t in cmd if not re.fullmatch(r"[A-Z_]+=.*", t)]
    if words and Path(words[0]).name.startswith("python") and len(words) > 1 and words[1].endswith(".py"):
        return words[1]
    return None


# ----------------------------------------------------------------------------- every block: checked
def test_every_runnable_block_is_found():
    assert len(CODE) >= 20 and any(b.path.name == "README.md" for b in CODE)
    for b in ALL:
        for kind, value in b.marks.items():
            if kind == "needs":
                unknown = {r.strip() for r in value.split(",")} - set(REASONS)
                assert not unknown, f"{b.id}: unknown needs reason {unknown}; use one of {sorted(REASONS)}"


def test_commands_a_user_would_copy_are_in_bash_blocks():
    bad = [b.id for b in ALL if b.lang == "" and re.match(r"\s*(\$ )?anymodal ", b.code)]
    assert not bad, f"tag these blocks ```bash (or show them otherwise): {bad}"


@pytest.mark.parametrize("block", CODE, ids=lambda b: b.id)
def test_block_is_well_formed(block: Block):
    if block.lang == "python":
        compile(block.code, block.id, "exec")
        if "excerpt" in block.marks:
            source = (ROOT / block.marks["excerpt"]).read_text(encoding="utf-8")
            for line in block.code.split("\n"):
                core = line.split("#")[0].rstrip()
                if core.strip() and core.strip() != "..." and not core.rstrip().endswith("..."):
                    assert core in source, f"{block.id}: not in {block.marks['excerpt']}: {core!r}"
        return
    assert "excerpt" not in block.marks
    for cmd in commands(block.code):
        argv = anymodal_argv(cmd)
        if argv is not None:
            chosen = argv[:1] if argv and argv[0] in COMMANDS else []
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    build_parser(chosen).parse_args(argv)
                except SystemExit as e:  # --help and --version exit 0; a bad flag exits 2
                    assert e.code == 0, f"{block.id}: `anymodal {shlex.join(argv)}`: {err.getvalue().strip()}"
        script = python_script(cmd)
        if script is not None:
            assert (ROOT / script).is_file(), f"{block.id}: no script {script}"


# ----------------------------------------------------------------------------- blocks that run here: run
def _workdir(tmp_path: Path) -> Path:
    for name in ("docs", "configs", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _run_shell(block: Block, cwd: Path) -> None:
    """Line by line, in order: an ``anymodal`` command in-process (exit status 0), any other line in bash."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line in logical_lines(block.code):
        cmds = commands(line)
        argv = anymodal_argv(cmds[0]) if len(cmds) == 1 else None
        if argv is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            assert rc == 0, f"{block.id}: `anymodal {shlex.join(argv)}` exited {rc}"
        else:
            res = subprocess.run(["bash", "-e", "-c", line], cwd=cwd, capture_output=True, text=True, env=env)
            assert res.returncode == 0, f"{block.id}: `{line}`: {res.stderr[-2000:]}"


def _doc_blocks_in_order(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in RUNNABLE and "needs" not in b.marks and "excerpt" not in b.marks]


@pytest.fixture
def registries_restored():
    """Doc examples register component types and modalities, and the registries are global: the docs
    run against the built-ins alone (types another test module registered at import are set aside),
    and every registry is as it was afterwards."""
    from anymodal import modality, registry
    from anymodal.generators import random_init

    regs = (registry.ENCODERS, registry.INPUT_PROJECTORS, registry.OUTPUT_PROJECTORS, registry.GENERATORS)
    saved = {r: dict(r._entries) for r in regs}
    builders, specs, keys = dict(random_init._BUILDERS), dict(modality._SPECS), dict(modality._KEYS)
    builtin_builders = {k: v for k, v in builders.items() if k in registry.GENERATORS._modules}
    for r in regs:
        for name in [n for n in r._entries if n not in r._modules]:
            del r._entries[name]
    random_init._BUILDERS.clear()
    random_init._BUILDERS.update(builtin_builders)
    yield
    for r, entries in saved.items():  # a built-in imported meanwhile stays registered
        for name in [n for n in r._entries if n not in r._modules]:
            del r._entries[name]
        r._entries.update(entries)
    random_init._BUILDERS.update(builders)
    for name in [n for n in random_init._BUILDERS if n not in builders and n not in registry.GENERATORS._modules]:
        del random_init._BUILDERS[name]
    modality._SPECS.clear()
    modality._SPECS.update(specs)
    for name in set(modality._KEYS) - set(keys):
        delattr(modality.Modality, name.upper())
    modality._KEYS.clear()
    modality._KEYS.update(keys)


RUN_FILES = [p for p in DOCS if _doc_blocks_in_order(p)]


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(path: Path, tmp_path, monkeypatch, registries_restored):
    cwd = _workdir(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__doc__"}
    for block in _doc_blocks_in_order(path):
        if block.lang == "python":
            exec(compile(block.code, block.id, "exec"), namespace)
        else:
            _run_shell(block, cwd)
