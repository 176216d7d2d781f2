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
    seen[" ".join(argv)] = [m for m in ("torch", "transformers", "diffusers", "numpy", "PIL") if m in sys.modules]
print(json.dumps(seen))
"""


def test_help_and_version_import_no_torch():
    """Nor numpy or PIL: the package registers its built-ins from light modules (anymodal.builtin)."""
    out = subprocess.run([sys.executable, "-c", _FAST_START], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"--help": [], "--version": [], "generate --help": []}


def test_version_prints_the_package_version(capsys):
    import anymodal

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"anymodal {anymodal.__version__}"


def _parsers(parser: argparse.ArgumentParser, path: str = "anymodal"):
    """Every parser of the command, nested subcommands (``toyworld train``) included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help_text():
    missing = [f"{path} {' / '.join(a.option_strings) or a.dest}"
               for path, p in _parsers(build_parser())
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_every_subcommand_is_covered():
    paths = {path for path, _ in _parsers(build_parser())}
    assert {f"anymodal {name}" for name in COMMANDS} <= paths and "anymodal toyworld train" in paths


def test_device_means_the_same_for_every_command():
    """Every command that runs a model takes --device DEVICE, default cpu, with one help text."""
    from anymodal.utils import DEVICE_HELP

    found = {}
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if "--device" in a.option_strings:
                found[path] = (a.default, a.choices, a.help)
    for cmd in ("generate", "batch", "chat", "serve", "eval", "train"):
        default, choices, text = found[f"anymodal {cmd}"]
        assert default == "cpu" and choices is None and text.startswith(DEVICE_HELP), cmd
    assert found["anymodal toyworld train"][0] == "cpu"


@pytest.mark.parametrize("argv", [
    ["generate", "a red circle", "--out", "{tmp}/o"],
    ["eval", "--n", "1"],
    ["train", "--stage", "1", "--config", "tiny", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/run"],
])
def test_a_device_that_is_not_there_is_one_line_and_exit_2(argv, tmp_path, capsys):
    # cuda:99 is missing on a CPU machine (no GPU) and on a GPU machine (no 100th GPU) alike
    rc = main([a.format(tmp=tmp_path) for a in argv] + ["--device", "cuda:99"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'cuda:99'" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_an_unknown_device_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["generate", "hi", "--out", str(tmp_path / "o"), "--device", "gpu0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "anymodal generate: error: unknown device 'gpu0'; use cpu, cuda, cuda:N, mps or auto"


def test_eval_split_names_match_the_docs():
    from anymodal.toyworld.evaluate import SPLITS

    for name, internal in (("heldout", "heldout"), ("seen", "train"), ("train", "train")):
        args = build_parser(["eval"]).parse_args(["eval", "--split", name])
        assert SPLITS[args.split] == internal


@pytest.mark.parametrize("source", [None, "default-dir", "tiny", "yaml-file"])
def test_info_prints_the_yaml_config_of_any_model_argument(source, tmp_path, capsys):
    import yaml

    from anymodal.pipeline import default_model_dir, shipped_config

    argv = {None: [], "default-dir": [str(default_model_dir())], "tiny": ["tiny"],
            "yaml-file": [str(shipped_config("tiny"))]}[source]
    assert main(["info", *argv]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["name"] == ("tiny" if source in ("tiny", "yaml-file") else "toyworld")
    assert set(data) >= {"llm", "encoders", "input_projectors", "output_projectors", "generators"}


def test_info_of_something_that_is_no_model_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a saved anymodal pipeline" in err


def test_serve_on_a_busy_port_is_one_line_exit_2_and_no_url(capsys):
    import socket

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--port", str(port)])
    out, err = capsys.readouterr()
    assert rc == 2 and "http://" not in out + err and len(err.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_generate_out_naming_rule_and_overwrite(tmp_path, capsys):
    """A rerun into the same --out adds -1 to each name; with --overwrite it replaces the files."""
    out = tmp_path / "o"
    argv = ["generate", "what colour is the sky", "--out", str(out), "--max-new-tokens", "2"]
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["text-1.txt", "text.txt"]
    (out / "text.txt").write_text("old\n")
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["text-1.txt", "text.txt"]
    assert (out / "text.txt").read_text() != "old\n"
    assert f"text: {out / 'text.txt'}" in capsys.readouterr().out


def test_generate_out_that_is_a_file_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    import anymodal.commands as commands

    monkeypatch.setattr(commands, "load_pipeline", lambda *a: pytest.fail("loaded a model for a bad --out"))
    (tmp_path / "f").write_text("x")
    for out, why in ((tmp_path / "f", "is a file, not a directory"), (tmp_path / "f" / "sub", "is a file")):
        assert main(["generate", "hi", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err
    assert (tmp_path / "f").read_text() == "x"
