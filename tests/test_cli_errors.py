"""One rule for every ``anymodal`` subcommand: an error is one line on stderr,
``anymodal CMD: error: ...``, and exit status 2, never a traceback; ``--debug`` gives the traceback.

Each subcommand is run in this process (``cli.main``) on a bad input that fails before any model is
loaded or trained, so the whole table costs seconds. A new subcommand must add its case here.
"""

from __future__ import annotations

import json

import pytest

from anymodal import cli

LIST_YAML = "- not\n- a mapping\n"


def _cases(tmp) -> dict[str, tuple[list[str], str]]:
    """subcommand -> (argv, a fragment its error line must hold)."""
    (tmp / "list.yaml").write_text(LIST_YAML)
    bad_yaml = str(tmp / "list.yaml")
    mapping = "a config must be a YAML mapping, got list"
    (tmp / "data.jsonl").write_text('{"caption": "x", "seed": ' + "9" * 5000 + "}\n")
    session = tmp / "session"
    session.mkdir()
    (session / "session.json").write_text(json.dumps({"format_version": 1, "turns": [{"text": "hi"}]}))
    return {
        "generate": (["generate", "hi", "--config", bad_yaml, "--out", str(tmp / "o")], mapping),
        "configs": (["configs"], "KeyError: 'boom' (an internal error: rerun with --debug"),  # see _break_configs
        "info": (["info", str(tmp / "missing.yaml")], "is neither a saved pipeline directory, a YAML config file, nor a shipped config name"),
        "train": (["train", "--stage", "1", "--config", "tiny", "--data", str(tmp / "data.jsonl"), "--out",
                   str(tmp / "run")], "line 1: a number in the JSON has too many digits"),
        "merge-lora": (["merge-lora", str(tmp / "nothing"), "--out", str(tmp / "m")],
                       "is not a saved anymodal pipeline"),
        "batch": (["batch", str(tmp / "missing.jsonl"), "--out", str(tmp / "b")], "batch input file not found"),
        "chat": (["chat", "--config", "tiny", "--load", str(session)], "turns[0] has no 'role'"),
        "serve": (["serve", "--config", bad_yaml, "--port", "0"], mapping),
        "toyworld": (["toyworld", "train", "--out", str(tmp / "tw"), "--threads", "0"],
                     "--threads must be at least 1"),
        "eval": (["eval", "--config", bad_yaml], mapping),
        "convert": (["convert", "nextgpt", str(tmp / "missing.pt"), "--llm", str(tmp / "llm"), "--out",
                     str(tmp / "c")], "NExT-GPT checkpoint not found"),
    }


def _break_configs(monkeypatch):
    """``configs`` reads no input, so it stands for the other path: an error of a type anymodal does not
    expect (a bug) is still one line, naming its type."""
    import anymodal.pipeline

    def boom():
        raise KeyError("boom")

    monkeypatch.setattr(anymodal.pipeline, "list_configs", boom)


def test_every_subcommand_has_a_bad_input_case(tmp_path):
    assert set(_cases(tmp_path)) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_a_bad_input_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv, fragment = _cases(tmp_path)[command]
    if command == "configs":
        _break_configs(monkeypatch)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()
             and not line.startswith(("anymodal: warning:", "20"))]  # warnings; the training log's timestamps
    assert "Traceback" not in captured.err
    assert lines and lines[0].startswith(f"anymodal {command}: error: "), captured.err
    assert fragment in lines[0], captured.err
    assert all(line.startswith("  ") for line in lines[1:]), captured.err  # only notes follow, indented


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_gives_the_traceback(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, _ = _cases(tmp_path)["merge-lora"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(FileNotFoundError, match="is not a saved anymodal pipeline"):
        cli.main(argv)


def test_an_unexpected_error_names_its_type_and_debug_reraises_it(tmp_path, monkeypatch, capsys):
    _break_configs(monkeypatch)
    assert cli.main(["configs"]) == 2
    assert capsys.readouterr().err == ("anymodal configs: error: KeyError: 'boom' (an internal error: rerun with "
                                       "--debug for the traceback, and report it)\n")
    with pytest.raises(KeyError, match="boom"):
        cli.main(["--debug", "configs"])


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import anymodal.pipeline

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(anymodal.pipeline, "list_configs", interrupted)
    assert cli.main(["configs"]) == 130
    assert capsys.readouterr().err == "anymodal configs: interrupted\n"
