"""A real uvicorn serving the UI app in a thread, and a raw HTTP client for it (any Host, any body).

Shared by test_ui.py and test_fuzz_server.py.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def serving(pipe, media_dir: Path, **options) -> Iterator[str]:
    """Serve ``create_app(pipe, media_dir, seed=0, **options)`` on 127.0.0.1 as ``anymodal serve`` does
    (``deadlines=ConnectionDeadlines(...)`` among the options sets the connection deadlines); yields its base URL."""
    import pytest
    import uvicorn

    from anymodal.ui import create_app
    from anymodal.ui.deadlines import server_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deadlines = options.pop("deadlines", None)
    app = create_app(pipe, media_dir=media_dir, seed=0, **options)
    # the same protocol and deadlines as `anymodal serve`
    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, deadlines, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the UI server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json().get("error", "") if self.headers.get("content-type", "").startswith("application/json") else ""

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def request(base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            host: str | None = None, timeout: float = 60, chunked: bool = False) -> Reply:
    """One HTTP/1.1 request; ``host`` overrides the Host header (default: the server's own);
    ``chunked`` sends the body in 64 KB chunks with no Content-Length."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else url.netloc)
        headers = dict(headers or {})
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
            body = b"".join(f"{len(body[i:i + 65536]):x}\r\n".encode() + body[i:i + 65536] + b"\r\n"
                            for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
        if method in ("POST", "PUT", "PATCH") and "Content-Length" not in headers \
                and headers.get("Transfer-Encoding") != "chunked":
            headers["Content-Length"] = str(len(body))
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            if body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early and closed: its answer is still there to read
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def multipart(parts: list[tuple[str, str | None, bytes] | tuple[str, str | None, bytes, str]],
              boundary: str = "b0undaryXyZ") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body from ``(name, filename or None, data[, content type])`` parts."""
    out = b""
    for p in parts:
        name, filename, data = p[:3]
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        if filename is not None:
            out += f"; filename=\"{filename}\"".encode()
        if len(p) == 4:
            out += f"\r\nContent-Type: {p[3]}".encode()
        out += b"\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def new_session(base: str) -> str:
    r = request(base, "POST", "/api/sessions")
    assert r.status == 200, r
    return r.json()["id"]


def png_bytes(size: tuple[int, int] = (12, 12), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def blank_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wave: np.ndarray | None = None, subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    wave = np.sin(np.linspace(0, 400, 8000)).astype(np.float32) * 0.1 if wave is None else wave
    sf.write(buf, wave, 16000, format="WAV", subtype=subtype)
    return buf.getvalue()


def files_under(directory: Path) -> list[str]:
    """Every file under ``directory``, relative, sorted (to show that a request left nothing)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
