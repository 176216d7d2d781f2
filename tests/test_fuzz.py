"""Hostile inputs across the API, the batch JSONL and saved/checkpoint directories.

Each input must end in one of two ways: a clear error raised by anymodal itself (its last frame in
anymodal's own code, its message naming the problem), or a documented output. Never a traceback
from deep inside a library, a hang past a time bound, or a lost or half-written file.

The fast cases run in CI; ``test_fuzz_random_*`` (marked slow) add a few hundred seeded mutations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from _taught import taught_pipeline
from anymodal.batch import RESULTS_NAME, read_rows, run_batch
from anymodal.media import Audio
from anymodal.pipeline import AnyModalOutput, AnyModalPipeline

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(ROOT / d) + os.sep for d in ("anymodal", "encoders", "generators"))
TIME_BOUND_S = 60
CLEAR = (ValueError, TypeError, OSError)  # MediaError and RowError are ValueErrors


# ============================================================================ helpers
@contextlib.contextmanager
def time_bound(seconds: float = TIME_BOUND_S):
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def refused(fn: Callable[[], Any], match: str) -> BaseException:
    """``fn`` raises a clear error from anymodal's own code whose message matches ``match``."""
    with time_bound():
        try:
            fn()
        except CLEAR as e:
            error = e
        else:
            raise AssertionError(f"accepted; expected an error matching {match!r}")
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    origin = tb.tb_frame.f_code.co_filename
    assert origin.startswith(OWN_CODE), f"{type(error).__name__} raised in {origin}, not by anymodal: {error}"
    import re

    assert re.search(match, str(error), re.S | re.I), f"{type(error).__name__}: {error!r} does not match {match!r}"
    assert len(str(error)) < 4000
    return error


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid PNG header that declares ``width x height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pipe():
    return taught_pipeline()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import soundfile as sf

    d = tmp_path_factory.mktemp("hostile")
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = d / name
        out[name].write_bytes(data)

    put("bomb.png", png_declaring(20000, 20000))
    put("strip.png", png_declaring(1, 50000))
    put("wide.png", png_declaring(3000, 100))
    put("zero.png", png_declaring(0, 10))
    good = d / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    out["good.png"] = good
    put("truncated.png", good.read_bytes()[:40])
    put("noise.png", bytes(random.Random(0).randrange(256) for _ in range(300)))
    put("text.png", b"hello, I am not an image\n")
    put("empty.png", b"")
    put("html.png", good.read_bytes() + b"<html><script>alert(1)</script></html>")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    out["anim.gif"] = d / "anim.gif"
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:])  # APNG
    out["anim.png"] = d / "anim.png"
    put("noise.mp4", bytes(random.Random(1).randrange(256) for _ in range(500)))
    put("noise.wav", b"RIFF" + bytes(random.Random(2).randrange(256) for _ in range(200)))
    put("text.wav", b"just text")
    sf.write(d / "loud.wav", np.full(16000, 3e38, np.float32), 16000, subtype="FLOAT")
    out["loud.wav"] = d / "loud.wav"
    sf.write(d / "slow.wav", np.zeros(16, np.float32), 8, subtype="FLOAT")
    out["slow.wav"] = d / "slow.wav"
    sf.write(d / "tone.wav", (0.1 * np.sin(np.arange(16000) / 8)).astype(np.float32), 16000)
    out["tone.wav"] = d / "tone.wav"
    (d / "folder.png").mkdir()
    out["folder.png"] = d / "folder.png"
    out["missing.png"] = d / "missing.png"
    return out


def call(pipe, *args, **kwargs):
    kwargs.setdefault("max_new_tokens", 2)
    return pipe(*args, **kwargs)


# ============================================================================ the API: prompts, seeds, settings
LONE = ["\ud800", "\udfff", "a\ud83d", "\udc00b"]

PROMPT_CASES = [
    ("none", None, "prompt is required"),
    ("dict", {"draw": 1}, "string or a list of strings, got dict"),
    ("set", {"draw"}, "got set"),
    ("int", 3, "got int"),
    ("bytes", b"draw", "got bytes"),
    ("list-with-none", ["ok", None], r"prompt\[1\] is NoneType"),
    ("list-with-int", ["ok", 3], r"prompt\[1\] is int"),
    ("nested", [["draw"]], r"prompt\[0\] is list"),
    ("empty-list", [], "nothing to generate"),
    ("empty", "", "prompt is empty"),
    ("blank", " \n\t ", "prompt is empty"),
    ("stray-image-placeholder", "look at <image>", "1 <image> placeholder.*0 image"),
    ("stray-video-placeholder", "<video><video>", "2 <video> placeholder"),
    ("over-long", "x" * 5000, "exceeds the model's context"),
    *[(f"surrogate-{i}", f"draw {s} cat", "lone surrogate") for i, s in enumerate(LONE)],
    *[(f"surrogate-in-batch-{i}", ["fine", s], r"prompt\[1\].*lone surrogate") for i, s in enumerate(LONE)],
]


@pytest.mark.parametrize("prompt,match", [c[1:] for c in PROMPT_CASES], ids=[c[0] for c in PROMPT_CASES])
def test_bad_prompts(pipe, prompt, match):
    refused(lambda: call(pipe, prompt), match)


SEED_CASES = [2**64, 2**63, -1, -(2**70), 1.5, float("nan"), "7", True, [1], b"1"]


@pytest.mark.parametrize("seed", SEED_CASES, ids=[repr(s)[:12] for s in SEED_CASES])
def test_bad_seeds(pipe, seed):
    refused(lambda: call(pipe, "hello", seed=seed), r"seed must be an integer in \[0, 2\*\*63 - 1\]")


TOKEN_CASES = [0, -1, 1.5, "3", True, float("inf")]


@pytest.mark.parametrize("n", TOKEN_CASES, ids=[repr(n) for n in TOKEN_CASES])
def test_bad_max_new_tokens(pipe, n):
    refused(lambda: call(pipe, "hello", max_new_tokens=n), "max_new_tokens must be a positive integer")


def test_too_many_new_tokens(pipe):
    refused(lambda: call(pipe, "hello", max_new_tokens=10**9), "exceeds the model's context")


SAMPLING_CASES = [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
]


@pytest.mark.parametrize("kwargs,match", SAMPLING_CASES, ids=[str(k) for k, _ in SAMPLING_CASES])
def test_bad_sampling(pipe, kwargs, match):
    refused(lambda: call(pipe, "hello", do_sample=True, **kwargs), match)


NONFINITE = [float("nan"), float("inf"), float("-inf")]
SETTINGS_CASES = [
    *[({m: {"num_inference_steps": v}}, f"{m}.num_inference_steps must be a positive integer")
      for m in ("image", "audio", "video") for v in (0, -1, 1.5, "2", True, *NONFINITE)],
    *[({m: {"num_inference_steps": 10**9}}, "at most") for m in ("image", "audio", "video")],
    *[({m: {"guidance_scale": v}}, f"{m}.guidance_scale must be a finite number >= 0")
      for m in ("image", "audio", "video") for v in (*NONFINITE, -1, "7", None)],
    *[({"image": {k: v}}, f"image.{k}") for k in ("height", "width") for v in (0, -8, 1.5, 10**6)],
    *[({"audio": {"audio_length_s": v}}, "audio.audio_length_s") for v in (0, -1, 1e9, *NONFINITE)],
    *[({"video": {"num_frames": v}}, "video.num_frames") for v in (0, 2.5, 10**7)],
    *[({"video": {"fps": v}}, "video.fps") for v in (0, 0.5, float("nan"))],
    ({"smell": {}}, "unknown modality|smell"),
    ({"image": {"steps": 3}}, "allowed fields"),
    ({"image": 5}, "must be ImageSettings or a dict"),
    (5, "settings must be a dict"),
    ([object()], "unknown settings object"),
]


@pytest.mark.parametrize("settings,match", SETTINGS_CASES, ids=[f"{i}" for i in range(len(SETTINGS_CASES))])
def test_bad_settings(pipe, settings, match):
    refused(lambda: call(pipe, "hello", settings=settings), match)


# ============================================================================ the API: media
IMAGE_FILE_CASES = [
    ("bomb.png", "pixels allowed|pixels is more than"),
    ("strip.png", "aspect ratio"),
    ("wide.png", "aspect ratio"),
    ("zero.png", "cannot read image"),
    ("truncated.png", "cannot read image"),
    ("noise.png", "not an image"),
    ("text.png", "not an image"),
    ("empty.png", "not an image|cannot read image"),
    ("anim.gif", "animated image; pass it as a video"),
    ("anim.png", "animated image; pass it as a video"),
    ("folder.png", "is a directory"),
    ("missing.png", "file not found"),
]


@pytest.mark.parametrize("name,match", IMAGE_FILE_CASES, ids=[c[0] for c in IMAGE_FILE_CASES])
def test_bad_image_files(pipe, files, name, match):
    refused(lambda: call(pipe, "what is this", images=str(files[name])), match)


def _pil_bomb():
    img = Image.new("L", (1, 1))
    img._size = (30000, 30000)  # what a lazily opened huge image reports
    return img


IMAGE_OBJECT_CASES = [
    ("empty-array", lambda: np.zeros((0, 0, 3), np.uint8), "empty|cannot read image"),
    ("strip-array", lambda: np.zeros((1, 5000, 3), np.uint8), "aspect ratio"),
    ("nan-array", lambda: np.full((8, 8, 3), np.nan, np.float32), "cannot read image"),
    ("float-255", lambda: np.full((8, 8, 3), 255.0, np.float32), r"\[0, 1\]"),
    ("complex", lambda: np.zeros((8, 8, 3), np.complex64), "unsupported array dtype"),
    ("five-channels", lambda: np.zeros((8, 8, 5), np.uint8), "cannot read image"),
    ("pil-strip", lambda: Image.new("RGB", (1, 100)), "aspect ratio"),
    ("pil-bomb", _pil_bomb, "pixels"),
    ("int", lambda: 5, "cannot use int as image"),
    ("none-in-list", lambda: [None], "cannot use NoneType as image"),
    ("dict", lambda: {"path": "x.png"}, "cannot use dict as image"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in IMAGE_OBJECT_CASES], ids=[c[0] for c in IMAGE_OBJECT_CASES])
def test_bad_image_objects(pipe, make, match):
    refused(lambda: call(pipe, "what is this", images=make()), match)


VIDEO_CASES = [
    ("still-png", lambda f: str(f["good.png"]), "still image"),
    ("noise-mp4", lambda f: str(f["noise.mp4"]), "cannot read video"),
    ("bomb-png", lambda f: str(f["bomb.png"]), "pixels allowed|pixels is more than"),
    ("empty-frames", lambda f: np.zeros((0, 8, 8, 3), np.uint8), "non-empty|cannot read video"),
    ("huge-frames", lambda f: np.zeros((2, 1, 4000, 3), np.uint8), "aspect ratio"),
    ("missing", lambda f: str(f["missing.png"]), "file not found"),
    ("int", lambda f: 7, "cannot use int as video"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in VIDEO_CASES], ids=[c[0] for c in VIDEO_CASES])
def test_bad_videos(pipe, files, make, match):
    refused(lambda: call(pipe, "what happens", videos=make(files)), match)


AUDIO_CASES = [
    ("ambiguous-8x3", lambda f: (np.zeros((8, 3), np.float32), 16000), "no clear layout"),
    ("square", lambda f: (np.zeros((100, 100), np.float32), 16000), "no clear layout"),
    ("many-channels", lambda f: (np.zeros((32, 16000), np.float32), 16000), "no clear layout"),
    ("one-hertz", lambda f: (np.zeros(16000, np.float32), 1), "1 Hz is outside"),
    ("zero-hertz", lambda f: (np.zeros(16000, np.float32), 0), "0 Hz is outside"),
    ("huge-rate", lambda f: Audio(np.zeros(16000, np.float32), 10**9), "outside"),
    ("loud", lambda f: (np.full(16000, 3e38, np.float32), 16000), "non-finite features"),
    ("loud-file", lambda f: str(f["loud.wav"]), "non-finite features"),
    ("slow-file", lambda f: str(f["slow.wav"]), "8 Hz is outside"),
    ("nan", lambda f: (np.full(16000, np.nan, np.float32), 16000), "NaN or infinite"),
    ("inf", lambda f: (np.full(16000, np.inf, np.float32), 16000), "NaN or infinite"),
    ("empty", lambda f: (np.zeros(0, np.float32), 16000), "empty"),
    ("3-d", lambda f: (np.zeros((2, 2, 16000), np.float32), 16000), "1-D waveform"),
    ("complex", lambda f: (np.zeros(16000, np.complex64), 16000), "unsupported dtype"),
    ("strings", lambda f: (np.array(["a", "b"]), 16000), "unsupported dtype"),
    ("noise-file", lambda f: str(f["noise.wav"]), "not audio"),
    ("text-file", lambda f: str(f["text.wav"]), "not audio"),
    ("rate-as-text", lambda f: (np.zeros(16000, np.float32), "16000"), "sample rate must be an integer"),
    ("missing", lambda f: str(f["missing.png"]), "file not found"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in AUDIO_CASES], ids=[c[0] for c in AUDIO_CASES])
def test_bad_audio(pipe, files, make, match):
    refused(lambda: call(pipe, "what is this sound", audios=make(files)), match)


def test_batch_media_must_match_prompts(pipe, files):
    refused(lambda: call(pipe, ["a", "b"], images=[str(files["good.png"])]), "one entry")


# ---------------------------------------------------------------- documented outputs
def test_typed_signal_tokens_stay_text(pipe):
    """Documented: ``<img_0>`` typed by a user is text; it never becomes a signal-token id."""
    proc = pipe.processor
    signal_ids = {i for ids in proc.signal_ids.values() for i in ids}
    typed = "".join(f"<img_{i}>" for i in range(4)) + " <aud_0><vid_23><img_999>"
    text = proc.format([proc_message(proc, typed)])
    ids = set(proc([text])["input_ids"][0].tolist())
    assert not ids & signal_ids
    assert isinstance(call(pipe, typed), AnyModalOutput)


def proc_message(proc, text):
    from anymodal.processor import Message

    return Message("user", proc.place_media(text, {}))


def test_html_appended_to_a_png_is_still_that_png(pipe, files):
    """Documented: trailing bytes after a PNG's end are ignored; the picture is what is read."""
    assert isinstance(call(pipe, "what is this", images=str(files["html.png"])), AnyModalOutput)


# ============================================================================ the batch JSONL
def _batch_lines(files: dict[str, Path]) -> list[tuple[bytes, str]]:
    """(raw line, what its error must say); an empty expectation means the row must be done."""
    def j(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    rows: list[tuple[bytes, str]] = [
        (j({"id": "good-1", "prompt": "draw a cat"}), ""),
        (b'{"id": "bad-utf8", "prompt": "caf\xff\xfe"}', "line 2: not valid UTF-8"),
        (b"{not json", "line 3: not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
        (j({"prompt": "no id"}), "has no 'id'"),
        (j({"id": 1.5, "prompt": "x"}), "'id' must be a string or an integer"),
        (j({"id": ["a"], "prompt": "x"}), "'id' must be a string or an integer"),
        (j({"id": None, "prompt": "x"}), "'id' must be a string or an integer"),
        (j({"id": True, "prompt": "x"}), "'id' must be a string or an integer"),
        (b'{"id": "sur\\ud800", "prompt": "x"}', "'id' is not valid Unicode"),
        (b'{"id": "ok-sur-prompt", "prompt": "draw \\udfff"}', "'prompt' is not valid Unicode"),
        (j({"id": "no-prompt"}), "'prompt' is missing"),
        (j({"id": "num-prompt", "prompt": 3}), "'prompt' must be a string"),
        (j({"id": "unknown", "prompt": "x", "colour": "red"}), "unknown field 'colour'"),
        (j({"id": "img-not-list", "prompt": "x", "images": 3}), "'images' must be a path or a list"),
        (j({"id": "img-ints", "prompt": "x", "images": [1, 2]}), "'images' must be a path or a list"),
        (j({"id": "img-missing", "prompt": "x", "images": ["nope.png"]}), "image file not found"),
        (j({"id": "img-bomb", "prompt": "x", "images": [str(files["bomb.png"])]}),
         "pixels allowed|pixels is more than"),
        (j({"id": "img-strip", "prompt": "x", "images": [str(files["strip.png"])]}), "aspect ratio"),
        (j({"id": "img-anim", "prompt": "x", "images": [str(files["anim.gif"])]}), "animated image"),
        (j({"id": "img-text", "prompt": "x", "images": [str(files["text.png"])]}), "not an image|cannot read"),
        (j({"id": "vid-still", "prompt": "x", "videos": [str(files["good.png"])]}), "still image"),
        (j({"id": "aud-slow", "prompt": "x", "audios": [str(files["slow.wav"])]}), "8 Hz is outside"),
        (j({"id": "good-2", "prompt": "play a tone"}), ""),
        (b'{"id": "nan", "prompt": "x", "settings": {"image": {"guidance_scale": NaN}}}', "guidance_scale"),
        (b'{"id": "inf", "prompt": "x", "settings": {"image": {"guidance_scale": Infinity}}}', "guidance_scale"),
        (b'{"id": "-inf", "prompt": "x", "settings": {"audio": {"audio_length_s": -Infinity}}}', "audio_length_s"),
        (j({"id": "steps-float", "prompt": "x", "settings": {"image": {"num_inference_steps": 1.5}}}),
         "num_inference_steps must be a positive integer"),
        (j({"id": "settings-list", "prompt": "x", "settings": [1]}), "'settings' must be an object"),
        (j({"id": "settings-smell", "prompt": "x", "settings": {"smell": {}}}), "bad settings"),
        (j({"id": "settings-field", "prompt": "x", "settings": {"image": {"steps": 2}}}), "allowed fields"),
        (j({"id": "mnt-0", "prompt": "x", "max_new_tokens": 0}), "'max_new_tokens' must be a positive integer"),
        (j({"id": "mnt-float", "prompt": "x", "max_new_tokens": 1.5}), "'max_new_tokens'"),
        (j({"id": "mnt-str", "prompt": "x", "max_new_tokens": "3"}), "'max_new_tokens'"),
        (j({"id": "seed-big", "prompt": "x", "seed": 2**64}), "'seed' must be an integer in"),
        (j({"id": "seed-neg", "prompt": "x", "seed": -1}), "'seed' must be an integer in"),
        (j({"id": "seed-float", "prompt": "x", "seed": 1.5}), "'seed' must be an integer"),
        (j({"id": "seed-str", "prompt": "x", "seed": "7"}), "'seed' must be an integer"),
        (j({"id": "too-long", "prompt": "x" * 5000}), "prompt too long"),
        (j({"id": "empty", "prompt": "  "}), "the prompt is empty"),
        (j({"id": "placeholder", "prompt": "see <image>"}), "placeholder"),
        (j({"id": "loud-audio", "prompt": "what is this sound", "audios": [str(files["loud.wav"])]}),
         "non-finite features"),
        (j({"id": "good-3", "prompt": "hello"}), ""),
        (j({"id": "typed-signal", "prompt": "<img_0><img_1><img_2><img_3>"}), ""),
    ]
    return rows


def test_batch_records_every_hostile_line(pipe, files, tmp_path):
    lines = _batch_lines(files)
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw for raw, _ in lines) + b"\n")  # a BOM, as some editors write
    out = tmp_path / "out"
    with time_bound(300):
        results = list(run_batch(pipe, read_rows(src), out, batch_size=8, base_dir=tmp_path, progress=False))
    assert len(results) == len(lines)
    recs = [json.loads(line) for line in (out / RESULTS_NAME).read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in recs] == list(range(len(lines)))  # one record per line, in input order
    for (raw, match), rec in zip(lines, recs):
        if not match:
            assert rec["status"] == "done", (raw[:80], rec["error"])
            for paths in rec["files"].values():
                for p in paths:
                    assert (out / p).is_file() and (out / p).stat().st_size > 0
        else:
            import re

            assert rec["status"] == "error", raw[:80]
            assert re.search(match, rec["error"]), (raw[:80], rec["error"])
            assert "Traceback" not in rec["error"]
    assert not [p for p in (out / "outputs").iterdir() if p.name.startswith(".")]  # nothing half-written
    # a re-run keeps the done rows and records the bad ones again, once each
    with time_bound(300):
        again = list(run_batch(pipe, read_rows(src), out, batch_size=8, base_dir=tmp_path, progress=False))
    assert sum(r.skipped for r in again) == sum(1 for _, m in lines if not m)
    assert len((out / RESULTS_NAME).read_text(encoding="utf-8").splitlines()) == len(lines)


def test_batch_bad_row_does_not_sink_its_batch(pipe, files, tmp_path):
    """A row that passes every check but fails while generating (audio that overflows the encoder)
    is recorded as an error; the other rows of its batch of 8 are generated and recorded."""
    rows = [{"id": f"r{i}", "prompt": "draw a cat"} for i in range(7)]
    rows.insert(3, {"id": "loud", "prompt": "draw a cat", "audios": [str(files["loud.wav"])]})
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with time_bound(300):
        results = list(run_batch(pipe, read_rows(src), out, batch_size=8, base_dir=tmp_path, progress=False))
    status = {r.id: r.status for r in results}
    assert status.pop("loud") == "error" and set(status.values()) == {"done"} and len(status) == 7


# ============================================================================ saved pipeline directories
@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "pipe"
    pipe.save_pretrained(path)
    return path


def _index(d: Path) -> dict:
    return json.loads((d / "anymodal_index.json").read_text())


def _set_index(d: Path, change: Callable[[dict], None]) -> None:
    index = _index(d)
    change(index)
    (d / "anymodal_index.json").write_text(json.dumps(index))


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _drop_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    t.pop(sorted(t)[0])
    save_file(t, str(path))


def _add_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    t["surprise"] = torch.zeros(2)
    save_file(t, str(path))


def _pickle_instead(path: Path, name: str) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(path)), path.parent / name)
    path.unlink()


def _outside_link(d: Path, rel: str) -> None:
    target = d.parent / "outside.safetensors"
    shutil.copy(d / rel, target)
    (d / rel).unlink()
    (d / rel).symlink_to(target)


def _comp(index: dict, *keys: str) -> dict:
    node = index["components"]
    for k in keys:
        node = node[k]
    return node


SAVED_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("index-not-json", lambda d: (d / "anymodal_index.json").write_text("{oops"), "not a valid anymodal index"),
    ("index-list", lambda d: (d / "anymodal_index.json").write_text("[]"), "not a valid anymodal index"),
    ("index-binary", lambda d: (d / "anymodal_index.json").write_bytes(b"\xff\xfe\x00"), "not a valid anymodal index"),
    ("format-2", lambda d: _set_index(d, lambda i: i.update(format_version=2)), "format version 2"),
    ("no-config", lambda d: _set_index(d, lambda i: i.pop("config")), "missing 'config'"),
    ("no-components", lambda d: _set_index(d, lambda i: i.pop("components")), "missing 'components'"),
    ("bad-config", lambda d: _set_index(d, lambda i: i["config"]["llm"].update(dtype="float8")), "llm.dtype"),
    ("llm-kind", lambda d: _set_index(d, lambda i: _comp(i, "llm").update(kind="magic")), "components.llm.kind"),
    ("llm-traversal", lambda d: _set_index(d, lambda i: _comp(i, "llm").update(path="../../../../etc")),
     "leaves the model directory"),
    ("llm-absolute", lambda d: _set_index(d, lambda i: _comp(i, "llm").update(path="/etc")),
     "must be a relative path"),
    ("llm-truncated", lambda d: _truncate(d / "llm" / "model.safetensors"), "safetensors"),
    ("llm-missing-key", lambda d: _drop_tensor(d / "llm" / "model.safetensors"), "missing keys"),
    ("llm-pickle", lambda d: _pickle_instead(d / "llm" / "model.safetensors", "pytorch_model.bin"),
     "pickle files.*allow_pickle=True"),
    ("llm-token-rows-relative", lambda d: _set_index(d, lambda i: _comp(i, "llm").update(
        kind="token_rows", base="llm")), "names a path relative to the current directory|hub id"),
    ("llm-token-rows-traversal", lambda d: _set_index(d, lambda i: _comp(i, "llm").update(
        kind="token_rows", base="../../../etc")), "neither an absolute path nor a hub id"),
    ("encoder-traversal", lambda d: _set_index(d, lambda i: _comp(i, "encoders", "imagebind").update(
        path="../../x")), "leaves the model directory"),
    ("encoder-external-relative", lambda d: _set_index(d, lambda i: _comp(i, "encoders", "imagebind").update(
        kind="external", source="encoders/../../x")), "neither an absolute path nor a hub id"),
    ("encoder-external-empty", lambda d: _set_index(d, lambda i: _comp(i, "encoders", "imagebind").update(
        kind="external", source="")), "absolute path or a hub id"),
    ("encoder-reference-relative", lambda d: _set_index(d, lambda i: _comp(i, "encoders", "imagebind").update(
        kind="reference")), "absolute path or a hub id"),
    ("encoder-missing", lambda d: _set_index(d, lambda i: _comp(i, "encoders").clear()),
     "components.encoders.imagebind is missing"),
    ("encoder-config-garbage", lambda d: (d / "encoders/imagebind/config.json").write_text("[1]"),
     "not a valid encoder config"),
    ("encoder-truncated", lambda d: _truncate(d / "encoders/imagebind/model.safetensors"),
     r"imagebind encoder: cannot read .*model.safetensors"),
    ("encoder-missing-key", lambda d: _drop_tensor(d / "encoders/imagebind/model.safetensors"), "missing keys"),
    ("encoder-extra-key", lambda d: _add_tensor(d / "encoders/imagebind/model.safetensors"),
     "unexpected keys: surprise"),
    ("projector-truncated", lambda d: _truncate(d / "input_projectors/image.safetensors"),
     r"cannot read .*input_projectors/image.safetensors"),
    ("projector-empty", lambda d: (d / "input_projectors/image.safetensors").write_bytes(b""),
     r"input_projectors/image.safetensors"),
    ("projector-missing-key", lambda d: _drop_tensor(d / "output_projectors/audio.safetensors"),
     r"output_projectors\[audio\].*missing keys"),
    ("projector-gone", lambda d: (d / "input_projectors/audio.safetensors").unlink(), "not found"),
    ("projector-unlisted", lambda d: _set_index(d, lambda i: _comp(i, "input_projectors").pop("video")),
     "has no weights for 'video'"),
    ("projector-traversal", lambda d: _set_index(d, lambda i: _comp(i, "input_projectors").update(
        image="../../../etc/passwd")), "leaves the model directory"),
    ("projector-symlink-out", lambda d: _outside_link(d, "input_projectors/image.safetensors"),
     "leaves the model directory"),
    ("adapter-traversal", lambda d: _set_index(d, lambda i: _comp(i).update(adapter="../adapter")),
     "leaves the model directory"),
    ("generator-traversal", lambda d: _set_index(d, lambda i: _comp(i, "generators", "image").update(
        path="../../generators/image")), "leaves the model directory"),
    ("generator-kind", lambda d: _set_index(d, lambda i: _comp(i, "generators", "audio").update(kind="magic")),
     "must be 'saved' or 'external'"),
    ("generator-unet-pickle", lambda d: _pickle_instead(d / "generators/image/unet/diffusion_pytorch_model.safetensors",
                                                        "diffusion_pytorch_model.bin"), "pickle files"),
    ("generator-truncated", lambda d: _truncate(d / "generators/audio/vae/diffusion_pytorch_model.safetensors"),
     "generator 'audioldm'.*safetensors|audio"),
    ("processor-gone", lambda d: shutil.rmtree(d / "processor"), "processor"),
    ("generator-unet-missing-key",
     lambda d: _drop_tensor(d / "generators/image/unet/diffusion_pytorch_model.safetensors"), r"\(unet\).*missing keys"),
    ("generator-text-encoder-missing-key",
     lambda d: _drop_tensor(d / "generators/video/text_encoder/model.safetensors"), r"\(text_encoder\).*missing keys"),
    ("generator-vocoder-missing-key", lambda d: _drop_tensor(d / "generators/audio/vocoder/model.safetensors"),
     r"\(vocoder\).*missing keys"),
]


@pytest.mark.parametrize("damage,match", [c[1:] for c in SAVED_CASES], ids=[c[0] for c in SAVED_CASES])
def test_hostile_saved_directories(saved, tmp_path, damage, match):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    damage(d)
    before = sorted(p.name for p in tmp_path.iterdir())
    # generators load lazily by default (their weights on first use); loading them now checks them too
    refused(lambda: AnyModalPipeline.from_pretrained(d, lazy_generators=False), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it


def test_pickle_weights_load_only_when_allowed(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    _pickle_instead(d / "llm" / "model.safetensors", "pytorch_model.bin")
    refused(lambda: AnyModalPipeline.from_pretrained(d), "pickle files")
    assert isinstance(AnyModalPipeline.from_pretrained(d, allow_pickle=True), AnyModalPipeline)


def test_cli_refuses_pickle_weights_without_the_flag(saved, tmp_path, capsys):
    from anymodal.cli import main

    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    _pickle_instead(d / "generators" / "image" / "unet" / "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.bin")
    args = ["generate", "hello", "--model", str(d), "--out", str(tmp_path / "out"), "--max-new-tokens", "2"]
    assert main(args) == 2
    assert "pickle files (unet/diffusion_pytorch_model.bin)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--allow-pickle"]) == 0


# ============================================================================ training checkpoint directories
def _checkpoint(d: Path) -> Path:
    from safetensors.torch import save_file

    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.bin")
    (d / "scheduler.json").write_text("{}")
    (d / "trainer_state.json").write_text("{}")
    return d


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


CHECKPOINT_CASES: list[tuple[str, Callable[[Path, bytes], None], str]] = [
    ("planted-custom-pickle", lambda d, p: (d / "custom_checkpoint_0.pkl").write_bytes(p), "custom_checkpoint_0"),
    ("planted-rng", lambda d, p: (d / "random_states_0.pkl").write_bytes(p), "cannot be read safely"),
    ("planted-optimizer", lambda d, p: (d / "optimizer.bin").write_bytes(p), "cannot be read safely"),
    ("planted-model-bin", lambda d, p: (d / "pytorch_model.bin").write_bytes(p), "does not write"),
    ("planted-extra", lambda d, p: (d / "evil.pt").write_bytes(p), "does not write"),
    ("truncated-optimizer", lambda d, p: _truncate(d / "optimizer.bin", 30), "cannot be read safely"),
    ("empty-rng", lambda d, p: (d / "random_states_0.pkl").write_bytes(b""), "cannot be read safely"),
    ("subdirectory", lambda d, p: (d / "nested").mkdir(), "does not write"),
    ("legacy-pickle", lambda d, p: ((d / "scheduler.json").unlink(), (d / "custom_checkpoint_0.pkl").write_bytes(p)),
     "cannot be read safely"),
]


@pytest.mark.parametrize("plant,match", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_hostile_checkpoints(tmp_path, plant, match):
    from anymodal.training.trainer import check_checkpoint

    marker = tmp_path / "pwned"
    d = _checkpoint(tmp_path / "step-00000001")
    plant(d, pickle.dumps(_Payload(str(marker))))
    refused(lambda: check_checkpoint(d), match)
    assert not marker.exists()


def test_clean_checkpoint_passes(tmp_path):
    from anymodal.training.trainer import check_checkpoint

    check_checkpoint(_checkpoint(tmp_path / "step-00000001"))


# ============================================================================ the larger, seeded variant
def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(max(len(data), 1))
        if op < 0.4 and data:
            data[i] = rng.randrange(256)
        elif op < 0.7:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del data[i:i + rng.randint(1, 32)]
    return bytes(data)


def _done_or_refused(fn: Callable[[], Any]) -> None:
    """A mutated input may still be valid: then it must give an output; otherwise a clear error."""
    with time_bound():
        try:
            out = fn()
        except CLEAR as e:
            tb = e.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            assert tb.tb_frame.f_code.co_filename.startswith(OWN_CODE), f"{type(e).__name__} from deep inside: {e}"
            return
    assert isinstance(out, AnyModalOutput)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_random_media_files(pipe, files, tmp_path, seed):
    """50 mutated PNG, GIF and WAV files per seed, as images, videos and audio."""
    rng = random.Random(seed)
    sources = [files["good.png"], files["anim.gif"], files["tone.wav"]]
    for k in range(50):
        src = rng.choice(sources)
        path = tmp_path / f"m{k}{src.suffix}"
        path.write_bytes(_mutate(src.read_bytes(), rng))
        kind = {".png": "images", ".gif": "videos", ".wav": "audios"}[src.suffix]
        _done_or_refused(lambda: call(pipe, "what is this", **{kind: str(path)}))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_fuzz_random_batch_lines(pipe, files, tmp_path, seed):
    """60 mutated JSONL lines per seed: every line is recorded once, the run never stops."""
    rng = random.Random(seed)
    base = [raw for raw, _ in _batch_lines(files) if b"\n" not in raw and len(raw) < 1000]
    lines = [_mutate(rng.choice(base), rng).replace(b"\n", b" ").replace(b"\r", b" ") for _ in range(60)]
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    with time_bound(600):
        list(run_batch(pipe, read_rows(src), out, batch_size=8, base_dir=tmp_path, progress=False))
    recs = [json.loads(line) for line in (out / RESULTS_NAME).read_text(encoding="utf-8").splitlines()]
    nonblank = sum(1 for line in lines if line.strip())
    assert len(recs) <= nonblank and len({r["key"] for r in recs}) == len(recs)
    assert all(r["status"] in ("done", "error") for r in recs)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_fuzz_random_saved_index(saved, tmp_path, seed):
    """30 mutated anymodal_index.json files per seed."""
    rng = random.Random(seed)
    raw = (saved / "anymodal_index.json").read_bytes()
    for k in range(30):
        d = tmp_path / f"copy{k}"
        shutil.copytree(saved, d)
        (d / "anymodal_index.json").write_bytes(_mutate(raw, rng))
        with time_bound():
            try:
                AnyModalPipeline.from_pretrained(d)
            except CLEAR as e:
                tb = e.__traceback__
                while tb.tb_next is not None:
                    tb = tb.tb_next
                assert tb.tb_frame.f_code.co_filename.startswith(OWN_CODE), f"{type(e).__name__}: {e}"
        shutil.rmtree(d)


def test_the_fast_suite_draws_enough_inputs():
    n = (len(PROMPT_CASES) + len(SEED_CASES) + len(TOKEN_CASES) + 1 + len(SAMPLING_CASES) + len(SETTINGS_CASES)
         + len(IMAGE_FILE_CASES) + len(IMAGE_OBJECT_CASES) + len(VIDEO_CASES) + len(AUDIO_CASES) + 1 + 2
         + len(_batch_lines({k: Path(k) for k in ("bomb.png", "strip.png", "anim.gif", "text.png", "good.png",
                                                  "slow.wav", "loud.wav")}))
         + 7 + len(SAVED_CASES) + 1 + len(CHECKPOINT_CASES) + 1)
    assert n >= 200, n
