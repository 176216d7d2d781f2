"""anymodal batch: resumable, batched, file-name safe, bad rows recorded, sharded across processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _taught import taught_pipeline
from anymodal.batch import RESULTS_NAME, read_rows, run_batch, safe_stem
from anymodal.modality import Modality

ROOT = Path(__file__).resolve().parents[1]
# torch keeps its import in one thread per process on the shared cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def pipe():
    return taught_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "pipe"
    pipe.save_pretrained(path)
    return path


def write_rows(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines()]


def many_rows(n: int) -> list[dict]:
    prompts = ["draw a cat", "play a tone", "show and play", "hello"]
    return [{"id": f"r{i:03d}", "prompt": prompts[i % 4]} for i in range(n)]


def check_complete(out: Path, rows: list[dict]) -> list[dict]:
    """Exactly one record per row, in input order, all done, every listed file present and whole."""
    recs = records(out)
    assert [r["id"] for r in recs] == [r["id"] for r in rows]
    assert all(r["status"] == "done" for r in recs), [r["error"] for r in recs if r["status"] != "done"]
    for r in recs:
        for kind, files in r["files"].items():
            for f in files:
                p = out / f
                assert p.is_file(), p
                if kind == "image":
                    Image.open(p).load()
    assert not list(out.glob("results.part*")) and not list((out / "outputs").glob(".*"))  # no leftovers
    return recs


# ---------------------------------------------------------------- names
@pytest.mark.parametrize("key", ["../../etc/passwd", "a/b", "", ".hidden", "..", "-rf", "x" * 300, "ümlaut\n", "/abs"])
def test_safe_stem_cannot_escape_or_hide(key):
    stem = safe_stem(key)
    assert stem and "/" not in stem and "\\" not in stem and not stem.startswith((".", "-"))
    assert len(stem) <= 80 and stem not in (".", "..")
    assert safe_stem(key) == stem  # deterministic


def test_ids_map_to_distinct_safe_directories(pipe, tmp_path):
    rows = [{"id": "../../etc/passwd", "prompt": "hello"}, {"id": "a/b", "prompt": "hello"},
            {"id": "a_b", "prompt": "hello"}, {"id": "", "prompt": "hello"}, {"id": "dup", "prompt": "hello"},
            {"id": "dup", "prompt": "hello"}, {"id": "Dup", "prompt": "hello"}, {"id": 7, "prompt": "hello"}]
    out = tmp_path / "out"
    results = list(run_batch(pipe, rows, out, batch_size=4, progress=False))
    assert [r.status for r in results] == ["done"] * len(rows)
    dirs = [r.files["text"][0].split("/")[1] for r in results]
    assert len({d.lower() for d in dirs}) == len(rows)  # distinct even on a case-insensitive file system
    for d in dirs:
        assert (out / "outputs" / d).resolve().parent == (out / "outputs").resolve()
    assert not (tmp_path / "etc").exists()
    assert [r.key for r in results][4:6] == ["dup", "dup#2"]
    # the same input names its rows the same way on a re-run in a fresh directory
    again = list(run_batch(pipe, rows, tmp_path / "again", batch_size=2, progress=False))
    assert [r.files["text"][0] for r in again] == [r.files["text"][0] for r in results]


# ---------------------------------------------------------------- outputs and bad rows
def test_media_come_out_and_bad_rows_are_recorded(pipe, tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"id": "cat", "prompt": "draw a cat"},
        {"id": "tone", "prompt": "play a tone", "settings": {"audio": {"num_inference_steps": 3}}},
        {"id": "with-image", "prompt": "hello", "images": ["in.png"]},
        {"id": "missing", "prompt": "x", "images": ["nope.png"]},
        {"id": "broken", "prompt": "x", "images": ["broken.png"]},
        {"id": "unknown-field", "prompt": "draw a cat", "settings": {"image": {"steps": 3}}},
        {"id": "unknown-modality", "prompt": "x", "settings": {"smell": {}}},
        {"id": "long", "prompt": "x" * 2000},
        {"id": "empty", "prompt": "   "},
        {"id": "no-prompt"},
        {"prompt": "no id"},
    ]
    inp = write_rows(tmp_path / "rows.jsonl", rows, extra_lines=("{not json",))
    out = tmp_path / "out"
    results = list(run_batch(pipe, read_rows(inp), out, batch_size=4, base_dir=tmp_path, progress=False))
    by_key = {r.key: r for r in results}
    assert by_key["cat"].text == "a cat <image>" and len(by_key["cat"].files["image"]) == 1
    assert by_key["tone"].text == "a tone <audio>" and len(by_key["tone"].files["audio"]) == 1
    assert by_key["with-image"].status == "done"
    reasons = {r.key: r.error for r in results if r.status == "error"}
    assert "image file not found: nope.png" in reasons["missing"]
    assert "broken.png" in reasons["broken"] or "cannot" in reasons["broken"].lower()
    assert "'steps'" in reasons["unknown-field"] and "allowed fields" in reasons["unknown-field"]
    assert "unknown modality 'smell'" in reasons["unknown-modality"]
    assert "prompt too long" in reasons["long"] and "1024" in reasons["long"]
    assert "empty" in reasons["empty"]
    assert "'prompt' is missing" in reasons["no-prompt"]
    assert reasons["row:10"] == "the row has no 'id'"
    assert "line 12: not valid JSON" in reasons["line:12"]
    assert len(reasons) == 9 and len(records(out)) == len(rows) + 1
    with Image.open(out / by_key["cat"].files["image"][0]) as im:
        assert im.size == (16, 16)
    assert (out / by_key["cat"].files["text"][0]).read_text() == "a cat <image>\n"
    assert set(by_key["cat"].timings) >= {"generate_s", "write_s", "batch_s", "batch_size"}


def test_hostile_rows_are_recorded_and_the_run_goes_on(saved, tmp_path):
    """Each of these once stopped the whole run (a re-run failing the same way): a line that is not
    UTF-8, an id or prompt with a lone surrogate, a decompression-bomb image inside a batch of 8;
    and NaN settings were generated and marked done."""
    from anymodal import cli

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(20000, 20000))
    lines = [json.dumps({"id": "cat-1", "prompt": "draw a cat"}).encode(),
             b'{"id": "latin1", "prompt": "caf\xe9 ' + b"x" * 5000 + b'"}',
             b'{"id": "sur\\ud800", "prompt": "draw a cat"}',
             b'{"id": "sur-prompt", "prompt": "draw \\udfff cat"}',
             json.dumps({"id": "bomb", "prompt": "draw a cat", "images": ["bomb.png"]}).encode(),
             b'{"id": "nan", "prompt": "draw a cat", "settings": {"image": {"guidance_scale": NaN}}}',
             *[json.dumps({"id": f"cat-{i}", "prompt": "draw a cat"}).encode() for i in range(2, 6)]]
    inp = tmp_path / "rows.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    args = ["batch", str(inp), "--out", str(tmp_path / "out"), "--model", str(saved), "--batch-size", "8",
            "--no-progress"]
    for _ in range(2):  # a re-run goes on the same way
        assert cli.main(args) == 0
        recs = [json.loads(line) for line in (tmp_path / "out" / RESULTS_NAME).read_text(encoding="utf-8").splitlines()]
        assert [r["index"] for r in recs] == list(range(len(lines)))
        errors = {r["index"]: r["error"] for r in recs if r["status"] == "error"}
        assert set(errors) == {1, 2, 3, 4, 5}
        assert "line 2: not valid UTF-8 text (byte 0xe9" in errors[1]
        assert "'id' is not valid Unicode text" in errors[2] and recs[2]["id"] == "sur\ud800"
        assert "'prompt' is not valid Unicode text" in errors[3]
        assert "decompression bomb" in errors[4]
        assert "guidance_scale must be a finite number" in errors[5]
        assert all(r["files"]["image"] for r in recs if r["status"] == "done")


def test_a_huge_seed_or_prompt_fails_its_row_alone_and_is_refused_before_tokenising(pipe, tmp_path, monkeypatch):
    """A 5000-digit seed once aborted the whole run with Python's int-limit message and no line number;
    a 30 MB prompt was tokenised in full (34 s) before it was refused."""
    huge = "draw a cat " * 200_000  # 2.2 MB
    lines = [json.dumps({"id": "a", "prompt": "draw a cat"}),
             '{"id": "big-seed", "prompt": "draw a cat", "seed": ' + "7" * 5000 + "}",
             json.dumps({"id": "long-seed", "prompt": "draw a cat", "seed": int("7" * 4000)}),
             json.dumps({"id": "huge", "prompt": huge}),
             json.dumps({"id": "b", "prompt": "draw a cat"})]
    inp = tmp_path / "rows.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    tokenised = []
    real = type(pipe.processor.tokenizer).__call__

    def spy(self, text, *a, **k):
        tokenised.append(len(text) if isinstance(text, str) else max(map(len, text)))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(pipe.processor.tokenizer), "__call__", spy)
    results = list(run_batch(pipe, read_rows(inp), tmp_path / "out", batch_size=4, progress=False))
    by_index = {r.index: r for r in results}
    assert [by_index[i].status for i in range(5)] == ["done", "error", "error", "error", "done"]
    assert by_index[1].error.startswith("line 2: a number in the JSON has too many digits")
    assert by_index[2].error == "'seed' must be an integer in [0, 2**63 - 1], got an integer of about 4001 digits"
    limit = pipe.context_length
    assert by_index[3].error == (f"'prompt' is too long: {len(huge)} characters, and the model's context of {limit} "
                                 f"tokens holds at most {pipe.processor.max_chars(limit)} characters; shorten it")
    assert tokenised and max(tokenised) < 10_000  # the huge prompt never reached the tokenizer
    assert by_index[0].text == by_index[4].text == "a cat <image>"
    # the pipeline and a chat session check the same bound first
    from anymodal.session import ChatSession

    tokenised.clear()
    with pytest.raises(ValueError, match=f"the prompt is too long: {len(huge)} characters"):
        pipe(huge)
    with pytest.raises(ValueError, match=r"prompt\[1\] is too long"):
        pipe(["draw a cat", huge])
    with pytest.raises(ValueError, match="the message is too long"):
        ChatSession(pipe).send(huge)
    assert not tokenised


def _png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_rows_are_grouped_by_settings_into_batched_generator_calls(pipe, tmp_path, monkeypatch):
    calls: list[tuple[int, str]] = []
    real = pipe.__class__.__call__

    def spy(self, prompts, *a, **k):
        calls.append((len(prompts), json.dumps(k.get("settings"), sort_keys=True)))
        return real(self, prompts, *a, **k)

    gen_rows: list[int] = []
    image_gen = pipe.generators[Modality.IMAGE]
    real_gen = image_gen.render
    monkeypatch.setattr(pipe.__class__, "__call__", spy)
    monkeypatch.setattr(image_gen, "render", lambda cond, *a, **k: gen_rows.append(
        next(iter(cond.values())).shape[0]) or real_gen(cond, *a, **k))
    fast = {"image": {"num_inference_steps": 1}}
    rows = [{"id": f"r{i}", "prompt": "draw a cat", **({"settings": fast} if i % 2 else {})} for i in range(7)]
    results = list(run_batch(pipe, rows, tmp_path / "out", batch_size=2, progress=False))
    assert all(r.status == "done" for r in results)
    # 4 default rows -> 2 calls of 2; 3 fast rows -> one call of 2 and one of 1; never mixed
    assert sorted(calls) == sorted([(2, "null"), (2, "null"), (2, json.dumps(fast, sort_keys=True)),
                                    (1, json.dumps(fast, sort_keys=True))])
    assert sorted(gen_rows) == [1, 2, 2, 2]  # the image generator ran batched
    assert {r.timings["batch_size"] for r in results} == {1, 2}


# ---------------------------------------------------------------- resume
def test_interrupted_run_resumes_without_loss_or_duplicates(pipe, tmp_path, monkeypatch):
    rows = many_rows(10)
    out = tmp_path / "out"
    it = run_batch(pipe, rows, out, batch_size=3, progress=False)
    first = [next(it) for _ in range(4)]  # stop between rows, mid-batch
    it.close()
    assert len(records(out)) == 4
    # a kill mid-write leaves a torn last line; a kill mid-row leaves a temporary or unrecorded output directory
    with (out / RESULTS_NAME).open("a") as f:
        f.write('{"key": "r009", "status": "do')
    (out / "outputs" / ".r008.abc123.tmp").mkdir()
    (out / "outputs" / ".r008.abc123.tmp" / "text.txt").write_text("half")
    (out / "outputs" / "r009").mkdir(exist_ok=True)
    (out / "outputs" / "r009" / "image_7.png").write_text("stale")
    resumed = list(run_batch(pipe, rows, out, batch_size=3, progress=False))
    assert [r.key for r in resumed if r.skipped] == [r.key for r in first]
    recs = check_complete(out, rows)
    assert not (out / "outputs" / "r009" / "image_7.png").exists()
    single = list(run_batch(pipe, rows, tmp_path / "fresh", batch_size=3, progress=False))
    assert [r["text"] for r in recs] == [r.text for r in single]
    # a third run does nothing
    assert all(r.skipped for r in run_batch(pipe, rows, out, batch_size=3, progress=False))
    assert len(records(out)) == len(rows)


def test_failed_rows_are_retried_and_recorded_once(pipe, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "later.png")
    rows = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "hello", "images": ["img.png"]}]
    out = tmp_path / "out"
    first = sorted(run_batch(pipe, rows, out, base_dir=tmp_path, progress=False), key=lambda r: r.index)
    assert [r.status for r in first] == ["done", "error"]
    (tmp_path / "later.png").rename(tmp_path / "img.png")  # the user fixes the row
    second = sorted(run_batch(pipe, rows, out, base_dir=tmp_path, progress=False), key=lambda r: r.index)
    assert [(r.skipped, r.status) for r in second] == [(True, "done"), (False, "done")]
    assert [r["status"] for r in records(out)] == ["done", "done"]


def test_killed_process_resumes_without_loss_or_duplicates(saved, tmp_path):
    rows = many_rows(80)
    inp = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "anymodal", "batch", str(inp), "--out", str(out), "--model", str(saved),
           "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # generous: a loaded machine starts slowly
    results = out / RESULTS_NAME
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = results.read_bytes().count(b"\n")
    assert 5 <= done_before < len(rows)
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped (done earlier)" in run.stdout
    recs = check_complete(out, rows)
    assert Counter(r["key"] for r in recs).most_common(1)[0][1] == 1


# ---------------------------------------------------------------- CLI and scale-out
def test_cli_summary_and_errors(pipe, tmp_path, monkeypatch, capsys):
    import anymodal.batch as batch
    import anymodal.cli as cli

    monkeypatch.setattr(batch, "load_pipeline", lambda *a: pipe)
    inp = write_rows(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "draw a cat"}, {"id": "b", "prompt": ""}])
    assert cli.main(["batch", str(inp), "--out", str(tmp_path / "o"), "--config", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 errors, 0 skipped" in out and "prompt is empty" in out
    assert cli.main(["batch", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"), "--config", "tiny"]) == 2
    assert "batch input file not found" in capsys.readouterr().err
    assert cli.main(["batch", str(inp), "--out", str(tmp_path / "o"), "--config", "tiny", "--batch-size", "0"]) == 2
    # --max-new-tokens applies to rows that give none
    assert cli.main(["batch", str(inp), "--out", str(tmp_path / "short"), "--config", "tiny", "--no-progress",
                     "--max-new-tokens", "3"]) == 0
    assert records(tmp_path / "short")[0]["text"] == "a c"


def test_two_processes_under_accelerate_launch(pipe, saved, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    rows = many_rows(12) + [{"id": "bad", "prompt": ""}]
    inp = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    # `--cpu` would silently start one process; --multi_gpu with ACCELERATE_USE_CPU starts gloo ranks
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "anymodal", "batch", str(inp), "--out", str(out), "--model", str(saved), "--batch-size", "2",
           "--no-progress"]
    run = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[process 0/2]" in run.stderr and "[process 1/2]" in run.stderr
    assert "merged 2 processes: 12 done, 1 errors, 13 rows" in run.stdout
    recs = records(out)
    assert [r["id"] for r in recs] == [r["id"] for r in rows] and not list(out.glob("results.part*"))
    assert [r["status"] for r in recs].count("done") == 12
    # the same texts as one process; a re-run under the launcher skips every done row
    single = {r.key: r.text for r in run_batch(pipe, rows, tmp_path / "one", progress=False)}
    assert all(r["text"] == single[r["key"]] for r in recs if r["status"] == "done")
    rerun = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "6 skipped" in rerun.stderr and len(records(out)) == len(rows)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_run_on_the_same_directory_is_refused(pipe, tmp_path):
    from anymodal.batch import BatchLockedError

    rows = many_rows(3)
    first = run_batch(pipe, rows, tmp_path / "out", batch_size=1, progress=False)
    next(first)  # holds the results file
    with pytest.raises(BatchLockedError, match="being written by another batch run"):
        next(run_batch(pipe, rows, tmp_path / "out", progress=False))
    assert len(list(first)) == 2
    assert len(records(tmp_path / "out")) == 3
    # a worker of an earlier multi-process run, still writing its part, also stops a new run
    import fcntl

    part = (tmp_path / "out" / "results.part1.jsonl").open("ab")
    fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(BatchLockedError, match="killed `accelerate launch`"):
            next(run_batch(pipe, rows, tmp_path / "out", progress=False))
    finally:
        part.close()
    assert all(r.skipped for r in run_batch(pipe, rows, tmp_path / "out", progress=False))


@pytest.mark.slow
def test_random_kills_of_single_and_two_process_runs(saved, tmp_path):
    """SIGKILL runs at random moments, alternating one process and two under accelerate launch
    (workers included, as a machine crash would); then finish. Nothing lost, nothing duplicated."""
    import random

    accelerate = Path(sys.executable).with_name("accelerate")
    rng = random.Random(1)
    rows = many_rows(120)
    inp = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    single = [sys.executable, "-m", "anymodal", "batch", str(inp), "--out", str(out), "--model", str(saved),
              "--no-progress"]
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              *single[1:]]

    def lines() -> int:
        return sum(f.read_bytes().count(b"\n") for f in out.glob("results*.jsonl")) if out.exists() else 0

    for attempt in range(6):
        cmd = (launch if attempt % 2 and accelerate.exists() else single) + ["--batch-size", str(rng.choice([1, 3]))]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        before, deadline = lines(), time.time() + 90
        while proc.poll() is None and lines() == before and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        workers = subprocess.run(["pgrep", "-f", "--", f"--out {out}"], capture_output=True, text=True).stdout.split()
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:  # torchrun's workers live in their own sessions
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert lines() < len(rows)
    run = subprocess.run(single + ["--batch-size", "8"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    check_complete(out, rows)
    names = {p.name for p in (out / "outputs").iterdir()}
    assert names == {r["files"]["text"][0].split("/")[1] for r in records(out)}  # no stray directories
