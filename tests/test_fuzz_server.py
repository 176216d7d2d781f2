"""Fuzzing `anymodal serve`: hundreds of hostile requests against the upload, session and media routes.

Each case is drawn from a seeded generator and says what it must get: a 4xx status and the start
of its message (or, for the few valid polyglots, a documented 200 with the medium served inert).
For every case: never a 500, an answer within a time bound, no file left behind by a refused
request, ``nosniff`` on every response, and no medium served with a content type outside the
allow-list. Mutated real files (bytes flipped or cut) may also be accepted, and are then served as
what they decoded as. The fast run draws 300 cases (a few seconds); ``-m slow`` draws 3000 more with other seeds.
"""

from __future__ import annotations

import functools
import io
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the web UI needs starlette (pip install 'anymodal[ui]')")
pytest.importorskip("uvicorn", reason="the web UI needs uvicorn (pip install 'anymodal[ui]')")

from _taught import taught_pipeline  # noqa: E402
from _uiclient import blank_png, files_under, multipart, new_session, png_bytes, request, serving, wav_bytes  # noqa: E402

TIME_BOUND_S = 15.0  # one refused request; generous for a loaded 2-core CI machine
FILE_CAP, REQUEST_CAP = 1_000_000, 2_500_000  # small, so that oversize cases are quick


@dataclass
class Case:
    what: str
    method: str
    path: str  # "{sid}" is filled with a live session id
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    host: str | None = None
    status: tuple[int, ...] = (400,)
    message: str = ""  # a regular expression the JSON error must match from its start
    plain: str | None = None  # instead: the exact plain-text answer (uvicorn's, before the app sees the request)
    chunked: bool = False
    accepted_media: str | None = None  # a documented 200: the content type its upload is served with
    may_accept: bool = False  # a 200 is as good as a refusal (a mutated file that still decodes)


# ---------------------------------------------------------------- the generators
NAMES = {"image": ["x.png", "photo.jpg", "a.gif", "pic.webp", "evil.html", "evil.svg", "x.js", "noext", "../../etc/x.png",
                   "C:\\Users\\me\\x.bmp"],
         "audio": ["a.wav", "a.mp3", "a.flac", "song.ogg", "evil.html", "a.svg", "a"],
         "video": ["v.mp4", "v.webm", "v.gif", "evil.html", "v.svg", "clip"]}
CTYPES = ["image/png", "image/svg+xml", "text/html", "audio/wav", "video/mp4", "application/octet-stream",
          "text/javascript", "application/x-shockwave-flash", ""]
ACTIVE = [b"<html><script>alert(1)</script></html>",
          b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>",
          b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
          b"alert(document.cookie)//", b"%PDF-1.4\n<< /JS (app.alert(1)) >>"]
MAGIC = {"image": [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x01\x00\x00WEBP", b"BM"],
         "audio": [b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03\x00"],
         "video": [b"\x00\x00\x00\x20ftypisom", b"\x1a\x45\xdf\xa3\x9fB\x86\x81\x01webm", b"GIF89a"]}


def shown(name: str) -> str:
    return re.split(r"[\\/]", name)[-1]


def refusal_for(kind: str, name: str) -> str:
    """The start of the message a file that is not a ``kind`` gets."""
    n = re.escape(shown(name))
    return {"image": rf"cannot read image '{n}': ", "audio": rf"(audio '{n}' is |cannot read audio '{n}': )",
            "video": rf"(video '{n}' is not a video|cannot read video '{n}')"}[kind]


def upload(kind: str, name: str, data: bytes, ctype: str | None, text: bytes = b"hello") -> tuple[bytes, dict]:
    part = (kind, name, data, ctype) if ctype else (kind, name, data)
    return multipart([("text", None, text), part])


def random_bytes_case(rng: random.Random) -> Case:
    kind = rng.choice(list(NAMES))
    name = rng.choice(NAMES[kind])
    data = rng.randbytes(rng.randint(1, 4000))
    body, headers = upload(kind, name, data, rng.choice(CTYPES))
    return Case(f"random {len(data)} bytes as {kind} {name!r}", "POST", "/api/sessions/{sid}/send", body, headers,
                status=(400, 415), message=refusal_for(kind, name))


def magic_junk_case(rng: random.Random) -> Case:
    kind = rng.choice(list(MAGIC))
    name = rng.choice(NAMES[kind])
    data = rng.choice(MAGIC[kind]) + rng.randbytes(rng.randint(0, 2000))
    body, headers = upload(kind, name, data, rng.choice(CTYPES))
    return Case(f"{data[:8]!r} + junk as {kind} {name!r}", "POST", "/api/sessions/{sid}/send", body, headers,
                status=(400, 415), message=refusal_for(kind, name))


def active_content_case(rng: random.Random) -> Case:
    kind = rng.choice(list(NAMES))
    name = rng.choice(NAMES[kind])
    data = rng.choice(ACTIVE)
    if rng.random() < 0.5:
        data = data + png_bytes()  # markup first: not an image whatever follows
    body, headers = upload(kind, name, data, rng.choice(["text/html", "image/svg+xml", "text/javascript"]))
    return Case(f"active content as {kind} {name!r}", "POST", "/api/sessions/{sid}/send", body, headers,
                status=(415,), message=refusal_for(kind, name))


def polyglot_case(rng: random.Random) -> Case:
    """A real medium with markup appended: accepted as what it decodes as, and served as exactly that."""
    if rng.random() < 0.5:
        kind, data, served = "image", png_bytes(), "image/png"
    else:
        kind, data, served = "audio", wav_bytes(), "audio/wav"
    name = rng.choice(["evil.html", "evil.svg", "x.js", "noext"])
    body, headers = upload(kind, name, data + rng.choice(ACTIVE), "text/html", text=b"hello")
    return Case(f"{kind} + markup named {name!r}", "POST", "/api/sessions/{sid}/send", body, headers,
                status=(200,), accepted_media=served)


BOMB_SIZES = [(20000, 20000), (7072, 7072), (12000, 9000), (50000, 1100)]


@functools.lru_cache(maxsize=None)
def _blank_png(width: int, height: int) -> bytes:
    return blank_png(width, height)


@functools.lru_cache(maxsize=None)
def valid_samples() -> dict[str, list[tuple[str, bytes]]]:
    """Small real files of each kind, for mutating."""
    import tempfile

    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (24, 24, 3), np.uint8)
    out: dict[str, list[tuple[str, bytes]]] = {"image": [], "audio": [], "video": []}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        out["image"].append((f"m.{fmt.lower()}", buf.getvalue()))
    out["audio"].append(("m.wav", wav_bytes()))
    frames = rng.integers(0, 255, (4, 16, 16, 3), np.uint8)
    with tempfile.TemporaryDirectory() as d:
        for ext, codec in ((".webm", "libvpx"), (".mp4", "libx264")):
            iio.imwrite(f"{d}/v{ext}", frames, extension=ext, codec=codec, fps=4, macro_block_size=1)
            out["video"].append((f"m{ext}", Path(f"{d}/v{ext}").read_bytes()))
    gif = io.BytesIO()
    Image.fromarray(frames[0]).save(gif, format="GIF", save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]])
    out["video"].append(("m.gif", gif.getvalue()))
    return out


def mutated_case(rng: random.Random) -> Case:
    """A real file with bytes flipped or cut: refused with its message, or (when it still decodes)
    accepted and served as what it decoded as."""
    kind = rng.choice(["image", "audio", "video"])
    name, data = rng.choice(valid_samples()[kind])
    data = bytearray(data)
    if rng.random() < 0.3:
        data = data[: rng.randint(1, len(data) - 1)]
    else:
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    body, headers = upload(kind, name, bytes(data), rng.choice(CTYPES))
    return Case(f"mutated {kind} {name!r}", "POST", "/api/sessions/{sid}/send", body, headers,
                status=(200, 400, 413, 415), message=refusal_for(kind, name), may_accept=True)


def bomb_case(rng: random.Random) -> Case:
    if rng.random() < 0.5:
        w, h = rng.choice(BOMB_SIZES)  # over 50 MP; a few sizes, since encoding each takes a second
        message = r"cannot read image 'b.png': .*(pixels is more than|pixels allowed)"
    else:
        short = rng.randint(1, 40)
        w, h = short, short * rng.randint(21, 400)
        if rng.random() < 0.5:
            w, h = h, w
        message = r"cannot read image 'b.png': its aspect ratio"
    kind = rng.choice(["image", "video"]) if message.endswith("ratio") else "image"
    data = _blank_png(w, h)
    if kind == "video":  # a still GIF sent as a video is checked the same way
        buf = io.BytesIO()
        Image.new("L", (w, h)).save(buf, format="GIF")
        data, message = buf.getvalue(), r"cannot read video 'b.png': its aspect ratio"
    body, headers = upload(kind, "b.png", data, "image/png")
    return Case(f"{w} x {h} {kind}", "POST", "/api/sessions/{sid}/send", body, headers, status=(400,), message=message)


def oversize_case(rng: random.Random) -> Case:
    choice = rng.randrange(4)
    chunked = rng.random() < 0.5
    if choice == 0:
        data = png_bytes() + bytes(rng.randint(FILE_CAP, 2 * FILE_CAP))
        body, headers = upload("image", "big.png", data, "image/png")
        return Case("one file over the cap", "POST", "/api/sessions/{sid}/send", body, headers, status=(413,),
                    message=r"big.png: larger than 1,000,000 bytes", chunked=chunked)
    if choice == 1:
        n = rng.randint(4, 8)
        parts = [("text", None, b"hi")] + [("image", f"p{k}.png", png_bytes() + bytes(700_000)) for k in range(n)]
        body, headers = multipart(parts)
        return Case(f"{n} files together over the cap", "POST", "/api/sessions/{sid}/send", body, headers,
                    status=(413,), message=r"the request is", chunked=chunked)
    if choice == 2:
        body, headers = multipart([("text", None, b"x" * rng.randint(65_537, 150_000))])
        return Case("text over the cap", "POST", "/api/sessions/{sid}/send", body, headers, status=(413,),
                    message=r"the (text is longer|request is)", chunked=chunked)
    body, headers = upload("image", "x.png", png_bytes(), None)
    return Case("a Content-Length far over the cap", "POST", "/api/sessions/{sid}/send", b"",
                {**headers, "Content-Length": str(rng.randint(REQUEST_CAP + 1, 10 ** 15))}, status=(413,),
                message=r"the request is [\d,]+ bytes; at most 2,500,000")


def traversal_case(rng: random.Random) -> Case:
    bad_ids = ["..", "%2e%2e", "..%2F..%2Fetc", "0" * 32, "A" * 32, "f" * 31, "f" * 33, "session", "web.json",
               "%00", "x" * 300, "%C0%AE%C0%AE", "1e100", "-1", "%E2%80%AE"]
    bad_names = ["..%2F..%2Fweb.json", "session.json", "web.json", "..", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 ".upload-x-0", "session%2Fsession.json", "x" * 400, "%00.png", "a.png%00.html"]
    r = rng.randrange(4)
    if r == 0:
        return Case("history of a bad id", "GET", f"/api/sessions/{rng.choice(bad_ids)}", status=(404,),
                    message="(no such session|not found)")
    if r == 1:
        body, headers = multipart([("text", None, b"hello")])
        return Case("send to a bad id", "POST", f"/api/sessions/{rng.choice(bad_ids)}/send", body, headers,
                    status=(404,), message="(no such session|not found)")
    if r == 2:
        return Case("media of a bad id", "GET", f"/media/{rng.choice(bad_ids)}/x.png", status=(404,), message="not found")
    return Case("a bad media name", "GET", "/media/{sid}/" + rng.choice(bad_names), status=(404,), message="not found")


def host_origin_case(rng: random.Random) -> Case:
    hosts = ["evil.example", "evil.example:80", "127.0.0.2", "localhost.evil.example", "0.0.0.0", "[::2]",
             "127.0.0.1.nip.io", "LOCALHOST.evil", "a" * 200]
    if rng.random() < 0.5:
        host = rng.choice(hosts)
        method, path = rng.choice([("GET", "/"), ("POST", "/api/sessions"), ("GET", "/api/sessions/{sid}"),
                                   ("GET", "/static/page.js")])
        return Case(f"Host {host!r}", method, path, host=host, status=(400,),
                    message=r"this server does not answer to the host")
    origin = rng.choice(["http://evil.example", "null", "https://127.0.0.1.evil.example", "http://127.0.0.1:1",
                         "file://", "http://localhost"])
    body, headers = multipart([("text", None, b"hello")])
    method, path, body = rng.choice([("POST", "/api/sessions", b""), ("POST", "/api/sessions/{sid}/send", body)])
    return Case(f"Origin {origin!r}", method, path, body, {**headers, "Origin": origin}, status=(403,),
                message=r"cross-origin request refused")


def malformed_multipart_case(rng: random.Random) -> Case:
    b = "bNd"
    ok_head = f"--{b}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhi\r\n"
    variants: list[tuple[str, bytes, str, tuple[int, ...], str]] = [
        ("no boundary", b"--x\r\n", "multipart/form-data", (415,), "send the message as multipart/form-data"),
        ("urlencoded", b"text=hi", "application/x-www-form-urlencoded", (415,), "send the message as multipart"),
        ("json", b'{"text": "hi"}', "application/json", (415,), "send the message as multipart"),
        ("truncated", ok_head.encode()[: rng.randint(5, len(ok_head) - 1)], f"multipart/form-data; boundary={b}",
         (400,), "malformed multipart body"),
        ("no closing boundary", ok_head.encode(), f"multipart/form-data; boundary={b}", (400,), "malformed multipart body"),
        ("wrong boundary", (ok_head + f"--{b}--\r\n").encode(), "multipart/form-data; boundary=other", (400,),
         "malformed multipart body"),
        ("no disposition", f"--{b}\r\nX-A: b\r\n\r\nhi\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}",
         (400,), "a form part has no Content-Disposition"),
        ("unknown field", f"--{b}\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nrm\r\n--{b}--\r\n".encode(),
         f"multipart/form-data; boundary={b}", (400,), "unknown form field 'cmd'"),
        ("text as a file", f"--{b}\r\nContent-Disposition: form-data; name=\"text\"; filename=\"t.txt\"\r\n\r\nhi\r\n"
         f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}", (400,), "'text' must be a form field"),
        ("a file without a name", f"--{b}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nhi\r\n--{b}--\r\n"
         .encode(), f"multipart/form-data; boundary={b}", (400,), "'image' must be a file"),
        ("two texts", (ok_head + ok_head + f"--{b}--\r\n").encode(), f"multipart/form-data; boundary={b}", (400,),
         "more than one 'text' field"),
        ("text not UTF-8", f"--{b}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n".encode() + b"\xff\xfe\xc0"
         + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}", (400,), "the text is not valid UTF-8"),
        ("an empty file", f"--{b}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"e.wav\"\r\n\r\n\r\n"
         f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}", (400,), "audio 'e.wav' is empty"),
        ("garbage", rng.randbytes(rng.randint(1, 3000)), f"multipart/form-data; boundary={b}", (400,),
         "malformed multipart body"),
        ("bad length", b"", f"multipart/form-data; boundary={b}", (400,), ""),
    ]
    what, body, ctype, status, message = rng.choice(variants)
    headers = {"Content-Type": ctype}
    if what == "bad length":  # h11 refuses it before the app runs
        headers["Content-Length"] = rng.choice(["-1", "1e9", "abc"])
        return Case(f"multipart: {what}", "POST", "/api/sessions/{sid}/send", body, headers, status=(400,),
                    plain="Invalid HTTP request received.")
    return Case(f"multipart: {what}", "POST", "/api/sessions/{sid}/send", body, headers, status=status,
                message=re.escape(message))


def bad_json_case(rng: random.Random) -> Case:
    r = rng.randrange(4)
    if r == 0:
        body = rng.choice([b"{", b"[1,", b"{'a': 1}", b"\xff\xfe", b"NaN]", b'{"a": }']) + rng.randbytes(rng.randint(0, 20))
        return Case("bad JSON", "POST", "/api/sessions", body, {"Content-Type": "application/json"}, status=(400,),
                    message=r"the body (is not valid JSON|must be a JSON object)")
    if r == 1:
        body = rng.choice([b"[]", b"1", b'"x"', b"null", b"true", b"[{}]"])
        return Case("JSON not an object", "POST", "/api/sessions", body, {"Content-Type": "application/json"},
                    status=(400,), message=r"the body must be a JSON object")
    if r == 2:
        body = rng.choice([b'{"system": "x"}', b'{"seed": 1e400}', b'{"__proto__": {}}', b'{"id": "../.."}'])
        return Case("unknown options", "POST", "/api/sessions", body, {"Content-Type": "application/json"},
                    status=(400,), message=r"unknown option\(s\)")
    return Case("a huge body", "POST", "/api/sessions", b"{" + b" " * rng.randint(5000, 50000) + b"}",
                {"Content-Type": "application/json"}, status=(413,), message=r"the body of POST /api/sessions",
                chunked=rng.random() < 0.5)


def wrong_method_case(rng: random.Random) -> Case:
    method, path = rng.choice([("PUT", "/api/sessions"), ("DELETE", "/api/sessions/{sid}"), ("PUT", "/api/sessions/{sid}/send"),
                               ("GET", "/api/sessions/{sid}/send"), ("POST", "/media/{sid}/x.png"), ("PATCH", "/"),
                               ("GET", "/api/sessions/{sid}/stream"), ("GET", "/api/sessions/{sid}/stop")])
    return Case(f"{method} {path}", method, path, status=(405,), message=rf"{method} is not allowed on /")


GENERATORS: list[tuple[Callable[[random.Random], Case], int]] = [  # (generator, weight)
    (random_bytes_case, 5), (magic_junk_case, 4), (active_content_case, 3), (polyglot_case, 1), (bomb_case, 2),
    (oversize_case, 2), (traversal_case, 3), (host_origin_case, 3), (malformed_multipart_case, 4),
    (bad_json_case, 2), (wrong_method_case, 1), (mutated_case, 3),
]


# Refused before the model is asked (by the form, a cap, a decode, the host or origin): the same
# refusal whether sent to /send or /stream, so half of them go to /stream.
STREAMABLE = ("multipart:", "one file over", "files together", "text over", "a Content-Length", "send to a bad id",
              "Origin", "active content")


def draw(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    gens, weights = zip(*GENERATORS)
    cases = [gen(rng) for gen in gens]  # every kind at least once
    cases += [rng.choices(gens, weights)[0](rng) for _ in range(n - len(cases))]
    pick = random.Random(seed + 10_000)  # its own stream: the cases drawn above stay what they were
    for case in cases:
        if case.path.endswith("/send") and case.what.startswith(STREAMABLE) and pick.random() < 0.5:
            case.path = case.path[: -len("send")] + "stream"
            case.what += " (to /stream)"
    return cases


# ---------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def pipe():
    return taught_pipeline()


def run_cases(pipe, media_dir: Path, cases: list[Case]) -> None:
    from anymodal.ui.server import MEDIA_TYPES, UploadLimits

    # short replies, and a fresh session after each accepted turn: no context of media to re-encode
    gen = serving(pipe, media_dir, limits=UploadLimits(file_bytes=FILE_CAP, request_bytes=REQUEST_CAP), max_new_tokens=2)
    url = next(gen)
    try:
        sids = [new_session(url) for _ in range(3)]
        every_sid = list(sids)
        failures = []
        served: list[str] = []
        for i, case in enumerate(cases):
            sid = sids[i % len(sids)]
            before = files_under(media_dir)
            start = time.perf_counter()
            try:
                r = request(url, case.method, case.path.replace("{sid}", sid), case.body, case.headers, host=case.host,
                            timeout=TIME_BOUND_S * 2, chunked=case.chunked)
            except Exception as e:  # a hang (socket timeout) or a dropped connection
                failures.append(f"{i} {case.what}: no answer ({type(e).__name__}: {e})")
                continue
            took = time.perf_counter() - start
            problems = []
            if r.status not in case.status:
                problems.append(f"status {r.status}, wanted {case.status}")
            if case.plain is not None:
                if r.body.decode("utf-8", "replace") != case.plain:
                    problems.append(f"answer {r.body[:200]!r}, wanted {case.plain!r}")
            elif r.status == 200 and case.may_accept:
                for item in r.json()["user"]["media"]:
                    ctype = request(url, "GET", item["url"]).headers.get("content-type")
                    if ctype not in MEDIA_TYPES.values():
                        problems.append(f"accepted, and served as {ctype}")
            elif case.accepted_media is None and (not r.error or not re.match(case.message, r.error)):
                problems.append(f"message {r.error!r} does not start with /{case.message}/")
            if r.status >= 400 and str(media_dir) in r.body.decode("utf-8", "replace"):
                problems.append("the answer names a server path")
            if took > TIME_BOUND_S:
                problems.append(f"took {took:.1f} s")
            if case.plain is None and r.headers.get("x-content-type-options") != "nosniff":
                problems.append("no nosniff header")
            after = files_under(media_dir)
            if case.accepted_media is None and not (case.may_accept and r.status == 200) and after != before:
                problems.append(f"files changed: {sorted(set(after) ^ set(before))}")
            if case.accepted_media is not None and r.status == 200:
                item = r.json()["user"]["media"][0]
                m = request(url, "GET", item["url"])
                if m.headers.get("content-type") != case.accepted_media:
                    problems.append(f"served as {m.headers.get('content-type')}, wanted {case.accepted_media}")
                served.append(item["url"])
            if r.status == 200 and case.path.endswith("/send"):
                sids[i % len(sids)] = new_session(url)
                every_sid.append(sids[i % len(sids)])
            if problems:
                failures.append(f"{i} {case.what}: {'; '.join(problems)} <- {r!r}")
        assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:30])
        # nothing the sessions hold is served as active content, and no upload is left half-kept
        for sid in every_sid:
            for turn in request(url, "GET", f"/api/sessions/{sid}").json()["turns"]:
                for item in turn["media"]:
                    ctype = request(url, "GET", item["url"]).headers["content-type"]
                    assert ctype in MEDIA_TYPES.values(), (item, ctype)
        assert not [f for f in files_under(media_dir) if "/.upload-" in f or f.endswith(".part")]
    finally:
        next(gen, None)


def test_the_draw_covers_every_route_and_kind():
    cases = draw(0, 300)
    assert len(cases) >= 100
    kinds = {c.what.split(" ")[0] for c in cases}
    assert {"random", "active", "history", "send", "Host", "Origin", "multipart:", "bad"} <= kinds
    assert any(c.path.startswith("/media/") for c in cases)
    assert sum(c.path.endswith("/stream") for c in cases) >= 20
    assert {c.method for c in cases} >= {"GET", "POST", "PUT", "DELETE"}


def test_fuzz_server_fast(pipe, tmp_path):
    run_cases(pipe, tmp_path / "media", draw(0, 300))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_server_slow(pipe, tmp_path, seed):
    run_cases(pipe, tmp_path / "media", draw(seed, 1000))
