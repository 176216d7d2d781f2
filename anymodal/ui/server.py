"""A small Starlette app over :class:`~anymodal.session.ChatSession` objects, and one HTML page.

Routes:
    GET  /                          the page (its script and style: /static/page.js, /static/page.css)
    GET  /favicon.ico               the page's icon
    POST /api/sessions              start a session -> {"id": ...}; the body is empty or ``{}``
    GET  /api/sessions              the saved sessions, newest first -> {"listed": bool, "sessions":
                                    [{"id", "title", "turns", "updated"}]} (listed only by a server that
                                    answers to local host names alone: elsewhere an id is a session's key)
    GET  /api/sessions/{id}         its turns
    POST /api/sessions/{id}/send    multipart form: ``text``, ``image``, ``audio`` and ``video`` files (repeatable)
                                    -> {"user": turn, "reply": turn}
    POST /api/sessions/{id}/stream  the same form; the reply as server-sent events (text/event-stream):
                                    ``start`` (the model took the turn), ``text`` ({"append": s} or
                                    {"text": s}: the reply so far), ``step`` ({"kind", "step", "total"}:
                                    a medium's denoising step), then one of ``reply`` (what /send
                                    returns), ``cancelled`` or ``error`` ({"error"}). An upload that is
                                    refused gets the same JSON error as from /send, before any event.
    POST /api/sessions/{id}/stop    stop the session's turns being generated -> {"stopped": n}; a stopped
                                    turn is dropped whole (the session keeps its completed turns)
    GET  /media/{id}/{name}         an uploaded or generated file of that session

A turn is ``{"role", "text", "media": [{"kind": "image"|"audio"|"video", "url"}]}``; ``text`` marks
each medium with its placeholder. Each session lives in ``media_dir/<id>/``: its uploads and
generated files, and after every turn the saved :class:`ChatSession` (``session/``, swapped in
whole) and what the page shows (``web.json``). Up to ``max_sessions`` idle sessions are kept in
memory; any other is loaded from its directory when asked for, so a server restarted on the same
``media_dir`` carries on its conversations. A session that a request is using is never unloaded,
and a save never replaces a copy on disk that holds more turns. One reply is generated at a time,
because a pipeline is not safe to call from several threads at once.

What the server guarantees (see docs/batch-and-sessions.md):

* **Hosts.** It answers only to the names in ``allowed_hosts`` (the Host header; DNS rebinding), and
  refuses a state-changing request whose ``Origin`` is not the server itself (cross-site posts).
* **Limits.** An upload is streamed to disk with a hard per-file and per-request cap; nothing over a
  cap is held in memory, and a failed request leaves no file behind. Served by :func:`serve`, every
  connection has a header deadline and a total request deadline (:mod:`anymodal.ui.deadlines`).
* **Content.** An upload is decoded before it is kept (PIL, libsndfile, ffmpeg) and stored under a
  name the server chooses, with the extension of what it decoded as. Images are refused by pixel
  count and aspect ratio before they are decoded. Media are served only with an allow-listed content
  type, ``nosniff`` and a sandboxing CSP; the page itself runs no inline script.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import io
import json
import logging
import re
import shutil
import tempfile
import threading
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..media import MediaError, check_image_size, open_image_checked
from ..modality import Modality
from ..session import ChatSession, Turn
from ..utils import atomic_write_text
from .page import PAGE_CSS, PAGE_HTML, PAGE_JS

logger = logging.getLogger(__name__)
NO_SESSION = "no such session (the server may have restarted)"

MAX_FILE_BYTES = 50 * 1024 * 1024  # one uploaded file
MAX_REQUEST_BYTES = 100 * 1024 * 1024  # one request body, all files together
MAX_FILES = 16  # files in one request
MAX_TEXT_BYTES = 64 * 1024  # the message text
MAX_MEDIA_SECONDS = 600.0  # an uploaded audio clip or video
MAX_BOUNDARY = 70  # characters of a multipart boundary (RFC 2046)
UPLOAD_IDLE_TIMEOUT_S = 60.0  # an upload that sends nothing for this long is dropped
KEEPALIVE_S = 15.0  # an event stream with nothing to say sends a comment this often (proxies drop idle streams)
MAX_LISTED = 200  # sessions GET /api/sessions lists
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

_UPLOAD_KINDS = {"image": Modality.IMAGE, "audio": Modality.AUDIO, "video": Modality.VIDEO}
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex: nothing else names a session directory
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9]{1,8})?$")  # the names the server gives files
WEB_FILE = "web.json"

# What an upload may decode as, and the extension it is stored under.
_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
_AUDIO_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
# The only content types media are served with; any other file is offered as a download.
MEDIA_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp", "bmp": "image/bmp",
    "wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg",
    "mp4": "video/mp4", "webm": "video/webm",
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
MEDIA_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"  # a medium opened on its own runs nothing
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                     (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class HTTPRefusal(Exception):
    """A request refused with ``status`` and a message for its sender."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ==================================================================== hosts, origins, headers
def _split_host(value: str) -> str:
    """The host name of a Host header value (``name``, ``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Guard:
    """ASGI middleware: the Host check, the Origin check of state-changing requests, and the
    security headers every response carries (a CSP for those that set none)."""

    def __init__(self, app, allowed_hosts: Sequence[str]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["method"], headers)
        if refusal is not None:
            return await _error(*refusal)(scope, receive, self._with_headers(send))
        await self.app(scope, receive, self._with_headers(send))

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not host:
            return 400, "missing Host header"
        if not self.any_host and _split_host(host) not in self.allowed:
            return 400, (f"this server does not answer to the host {host[:100]!r}; start it with "
                         "--allowed-host NAME to allow another name")
        if method in _UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"):
                return 403, f"cross-origin request refused: Origin {origin[:100]!r} is not this server"
            if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return 403, "cross-site request refused (Sec-Fetch-Site: " + headers["sec-fetch-site"][:40] + ")"
        return None

    @staticmethod
    def _with_headers(send):
        async def sender(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)
        return sender


# ==================================================================== sessions
@dataclass
class _WebSession:
    chat: ChatSession
    directory: Path
    files: dict[str, Path] = field(default_factory=dict)  # served name -> path; nothing else is served
    turn_media: list[list[dict[str, str]]] = field(default_factory=list)  # per turn: [{"kind", "url"}]
    lock: threading.Lock = field(default_factory=threading.Lock)  # one send or save at a time
    users: int = 0  # requests using it now (guarded by the store's lock): never unloaded while > 0
    saved: bool = True  # its directory holds every turn: it may be unloaded
    jobs: set["_Job"] = field(default_factory=set)  # its turns being generated (or waiting to be): Stop stops them

    def add_file(self, sid: str, path: Path, kind: str) -> dict[str, str]:
        self.files[path.name] = path
        return {"kind": kind, "url": f"/media/{sid}/{path.name}"}


class SessionConflict(OSError):
    """The copy of a session on disk holds more turns than the one being saved."""


class SessionStore:
    """The server's sessions, and the lock that serialises generation."""

    def __init__(self, pipe, media_dir: Path, seed: int | None = 0, max_new_tokens: int | None = None,
                 max_sessions: int = 64):
        self.pipe = pipe
        self.media_dir = media_dir
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, _WebSession] = OrderedDict()
        self.generate_lock = threading.Lock()
        self._lock = threading.Lock()

    def create(self) -> str:
        sid = uuid.uuid4().hex
        directory = self.media_dir / sid
        directory.mkdir(parents=True)
        web = _WebSession(self._new_chat(), directory)
        self._write_web(web)  # so that it can be unloaded and found again before its first turn
        with self._lock:
            self.sessions[sid] = web
            self._trim()
        return sid

    def _trim(self) -> None:
        """Unload least recently used sessions beyond ``max_sessions``; never one in use or unsaved."""
        for sid in list(self.sessions):
            if len(self.sessions) <= self.max_sessions:
                break
            web = self.sessions[sid]
            if web.users == 0 and web.saved:
                del self.sessions[sid]
                logger.info("unloading the least recently used session %s (it stays on disk)", sid)

    @contextlib.contextmanager
    def pinned(self, web: _WebSession) -> Iterator[None]:
        """Keep ``web`` in memory for the block, also when the request that holds it has gone (the
        model's thread goes on after a client disconnects)."""
        with self._lock:
            web.users += 1
        try:
            yield
        finally:
            with self._lock:
                web.users -= 1
                self._trim()

    def start_job(self, web: _WebSession, job: "_Job") -> None:
        """Register a streamed turn of ``web`` (so that Stop finds it) and keep ``web`` in memory
        until :meth:`end_job`."""
        with self._lock:
            web.users += 1
            web.jobs.add(job)

    def end_job(self, web: _WebSession, job: "_Job") -> None:
        with self._lock:
            web.jobs.discard(job)
            web.users -= 1
            self._trim()

    def stop_jobs(self, web: _WebSession) -> int:
        """Stop every turn of ``web`` being generated or waiting to be; how many there were."""
        with self._lock:
            jobs = list(web.jobs)
        for job in jobs:
            job.stop.set()
        return len(jobs)

    def list_saved(self, limit: int = MAX_LISTED) -> list[dict[str, Any]]:
        """The sessions in ``media_dir`` that hold at least one turn, most recently changed first."""
        found = []
        for directory in self.media_dir.iterdir():
            web_file = directory / WEB_FILE
            if not _SESSION_ID.fullmatch(directory.name):
                continue
            try:
                updated = web_file.stat().st_mtime
                if web_file.stat().st_size > 4 << 20:  # not one this server wrote
                    continue
                state = json.loads(web_file.read_text())
                turns, title = state.get("turns", 0), state.get("title")
                if title is None and isinstance(turns, int) and turns > 0:  # saved before titles were kept
                    title = _title_from_saved_chat(directory / "session")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(turns, int) and turns > 0:
                found.append({"id": directory.name, "title": title if isinstance(title, str) else "",
                              "turns": turns, "updated": updated})
        found.sort(key=lambda item: item["updated"], reverse=True)
        return found[:limit]

    @contextlib.contextmanager
    def use(self, sid: str) -> Iterator[_WebSession | None]:
        """The session ``sid`` (from memory, else from its directory; ``None`` if it has none), kept in
        memory until the block ends."""
        with self._lock:
            web = self.sessions.get(sid)
            if web is None and _SESSION_ID.fullmatch(sid) and (self.media_dir / sid / WEB_FILE).is_file():
                try:  # under the lock: two requests loading one session must share one copy
                    web = self._load(sid)
                except (OSError, ValueError, KeyError, TypeError) as e:
                    logger.warning("cannot load session %s from %s: %s", sid, self.media_dir / sid, e)
                    web = None
            if web is not None:
                self.sessions[sid] = web
                self.sessions.move_to_end(sid)
                web.users += 1
        try:
            yield web
        finally:
            if web is not None:
                with self._lock:
                    web.users -= 1
                    self._trim()

    def save(self, sid: str, web: _WebSession) -> None:
        """Write the session (after a turn): the chat first, then what the page shows. Refuses to
        replace a copy on disk with more turns (another server on the same ``media_dir``)."""
        try:
            on_disk = json.loads((web.directory / WEB_FILE).read_text()).get("turns", 0)
        except (OSError, ValueError, AttributeError):
            on_disk = 0
        if isinstance(on_disk, int) and on_disk > len(web.chat.turns):
            raise SessionConflict(f"session {sid} on disk has {on_disk} turns, newer than this copy's "
                                  f"{len(web.chat.turns)}; not overwritten")
        web.chat.save(web.directory / "session")
        self._write_web(web)

    def _new_chat(self) -> ChatSession:
        return ChatSession(self.pipe, seed=self.seed, max_new_tokens=self.max_new_tokens)

    @staticmethod
    def _write_web(web: _WebSession) -> None:
        title = _title(next((t.text for t in web.chat.turns if t.role == "user"), ""))
        atomic_write_text(web.directory / WEB_FILE, json.dumps(
            {"turns": len(web.chat.turns), "title": title, "turn_media": web.turn_media, "files": sorted(web.files)},
            indent=1) + "\n")

    def _load(self, sid: str) -> _WebSession:
        directory = self.media_dir / sid
        state = json.loads((directory / WEB_FILE).read_text())
        for tmp in directory.glob(".session.*.tmp"):  # a save a crash cut short: not in use, since not loaded
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
        if state.get("turns") == 0 and not (directory / "session").exists() \
                and not any(directory.glob(".session.old-*")):  # created, and never saved a turn
            return _WebSession(self._new_chat(), directory)
        chat = ChatSession.load(directory / "session", self.pipe)  # recovers a swap a crash cut short
        turn_media = [list(m) for m in state["turn_media"]][: len(chat.turns)]
        turn_media += [[] for _ in range(len(chat.turns) - len(turn_media))]  # a save cut between the two files
        files = {name: directory / name for name in state["files"]
                 if isinstance(name, str) and _SAFE_NAME.fullmatch(name) and (directory / name).is_file()}
        return _WebSession(chat, directory, files, turn_media)


def _title(text: str) -> str:
    """What the sessions list calls a chat: its first message, without media placeholders, on one
    line, at most 80 characters."""
    title = " ".join(re.sub(r"<[a-z][a-z0-9_]*>", " ", text).split())
    return title[:79] + "…" if len(title) > 80 else title


def _title_from_saved_chat(directory: Path) -> str:
    path = directory / "session.json"
    if not path.is_file() or path.stat().st_size > 16 << 20:
        return ""
    turns = json.loads(path.read_text()).get("turns") or []
    return _title(next((t.get("text", "") for t in turns if isinstance(t, dict) and t.get("role") == "user"), ""))


def _turn_json(turn: Turn, media: list[dict[str, str]]) -> dict[str, Any]:
    return {"role": turn.role, "text": turn.text, "media": media}


def _write_generated(web: _WebSession, sid: str, number: int, reply: Turn) -> list[dict[str, str]]:
    """Write each generated medium with its modality's spec (images as PNG, audio as WAV, videos as
    animated GIF, which every browser plays in an <img>); the page shows the built-in kinds and
    offers any other registered modality's files as downloads (served as attachments)."""
    media = []
    for m, items in reply.media.items():
        spec = m.spec
        for k, item in enumerate(items):
            path = spec.save(item, web.directory / f"{number:03d}_reply_{m.value}_{k}{spec.suffix}")
            media.append(web.add_file(sid, path, m.value))
    return media


# ==================================================================== streaming a turn
class _Stopped(Exception):
    """The sender pressed Stop: raised in the model's thread from a progress hook."""


class _Job:
    """One turn being generated, seen from both sides: the model's thread reports progress into it
    (and is stopped through it), the event loop sends what it reports as server-sent events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self.stop = threading.Event()
        self.text = ""

    # ---- in the model's thread
    def check(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def emit(self, event: str | None, data: dict[str, Any] | None = None) -> None:
        """Queue an event for the page (``None``: the end of the stream)."""
        item = None if event is None else (event, data or {})
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server has stopped: nobody is listening
            pass

    def on_text(self, text: str) -> None:
        self.check()
        if text == self.text:
            return
        if text.startswith(self.text):  # the usual case: send what is new
            self.emit("text", {"append": text[len(self.text):]})
        else:  # a stop string or a signal block rewrote the end
            self.emit("text", {"text": text})
        self.text = text

    def on_step(self, modality: Modality, step: int, total: int) -> None:
        self.check()
        self.emit("step", {"kind": modality.value, "step": step, "total": total})

    # ---- on the event loop
    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            try:
                item = await asyncio.wait_for(self.events.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield b": waiting\n\n"
                continue
            if item is None:
                return
            event, data = item
            yield f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# ==================================================================== uploads
@dataclass
class _Upload:
    kind: str  # "image" | "audio" | "video"
    filename: str  # the sender's name for it, cleaned, for messages only
    path: Path  # where it is on disk now
    size: int = 0


def _display_name(raw: str) -> str:
    """The sender's file name, for messages: its last path component, printable, at most 80 characters."""
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] not in "CZ" or c == " ").strip()
    return (name[:77] + "...") if len(name) > 80 else (name or "(unnamed)")


@dataclass
class UploadLimits:
    file_bytes: int = MAX_FILE_BYTES
    request_bytes: int = MAX_REQUEST_BYTES
    files: int = MAX_FILES
    text_bytes: int = MAX_TEXT_BYTES
    media_seconds: float = MAX_MEDIA_SECONDS
    idle_timeout_s: float = UPLOAD_IDLE_TIMEOUT_S


async def _read_form(request: Request, directory: Path, batch: str, limits: UploadLimits,
                     uploads: list[_Upload]) -> str:
    """Stream a multipart body: files go straight to hidden files in ``directory`` (appended to
    ``uploads`` as they are opened, so that the caller can remove them on any error), the text is
    returned. Every cap is checked as the bytes arrive."""
    from python_multipart.multipart import parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPRefusal(415, "send the message as multipart/form-data (fields: text, image, audio, video)")
    if len(params[b"boundary"]) > MAX_BOUNDARY:  # RFC 2046; python-multipart would raise past 256
        raise HTTPRefusal(400, f"the multipart boundary is {len(params[b'boundary'])} characters long; at most "
                               f"{MAX_BOUNDARY} are allowed (RFC 2046)")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPRefusal(400, f"bad Content-Length {length[:40]!r}")
        if int(length) > limits.request_bytes:
            raise HTTPRefusal(413, f"the request is {int(length):,} bytes; at most {limits.request_bytes:,} are "
                                   "accepted (all files together)")
    return await _MultipartForm(directory, batch, limits, uploads).read(request, params[b"boundary"])


class _MultipartForm:
    """The callbacks of python-multipart's streaming parser for one request: each part's headers,
    then its bytes, to the text field or to an upload file, checked against the limits as they arrive."""

    def __init__(self, directory: Path, batch: str, limits: UploadLimits, uploads: list[_Upload]):
        self.directory, self.batch, self.limits, self.uploads = directory, batch, limits, uploads
        self.text_parts: list[bytes] = []
        self.part: dict[str, Any] = {}
        self.header: dict[str, bytes] = {"field": b"", "value": b""}
        self.ended = False

    async def read(self, request: Request, boundary: bytes) -> str:
        from python_multipart.exceptions import MultipartParseError
        from python_multipart.multipart import MultipartParser

        limits = self.limits
        parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end, "on_end": self.on_end})
        received = 0
        chunks = request.stream().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), limits.idle_timeout_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise HTTPRefusal(408, f"the upload sent nothing for {limits.idle_timeout_s:g} s") from None
                received += len(chunk)
                if received > limits.request_bytes:
                    raise HTTPRefusal(413, f"the request is larger than {limits.request_bytes:,} bytes, the most "
                                           "accepted (all files together)")
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as e:
            raise HTTPRefusal(400, f"malformed multipart body: {e}") from None
        finally:
            self.on_part_end()
        if not self.ended and received:  # an empty body is an empty form
            raise HTTPRefusal(400, "malformed multipart body: it ends before its closing boundary")
        try:
            return self.text_parts[0].decode("utf-8") if self.text_parts else ""
        except UnicodeDecodeError:
            raise HTTPRefusal(400, "the text is not valid UTF-8") from None

    def on_part_begin(self) -> None:
        self.part.clear()
        self.part["headers"] = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header["field"] += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header["value"] += data[start:end]

    def on_header_end(self) -> None:
        self.part["headers"][self.header["field"].decode("latin-1").lower()] = self.header["value"]
        self.header["field"] = self.header["value"] = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        part, limits = self.part, self.limits
        disposition, opts = parse_options_header(part["headers"].get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in opts:
            raise HTTPRefusal(400, "a form part has no Content-Disposition: form-data; name=...")
        name = opts[b"name"].decode("utf-8", "replace")
        filename = opts.get(b"filename")
        if name == "text":
            if filename is not None:
                raise HTTPRefusal(400, "'text' must be a form field, not a file")
            if self.text_parts:
                raise HTTPRefusal(400, "more than one 'text' field")
            part["text"] = True
            self.text_parts.append(b"")
            return
        if name not in _UPLOAD_KINDS:
            raise HTTPRefusal(400, f"unknown form field {name[:40]!r}; the fields are text, image, audio and video")
        if filename is None:
            raise HTTPRefusal(400, f"{name!r} must be a file")
        if not filename:  # an empty file input of a browser form
            part["skip"] = True
            return
        if len(self.uploads) >= limits.files:
            raise HTTPRefusal(413, f"more than {limits.files} files in one message")
        path = self.directory / f".upload-{self.batch}-{len(self.uploads)}"
        up = _Upload(name, _display_name(filename.decode("utf-8", "replace")), path)
        self.uploads.append(up)
        part["upload"] = up
        part["file"] = open(path, "xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part, limits, n = self.part, self.limits, end - start
        if "text" in part:
            if len(self.text_parts[0]) + n > limits.text_bytes:
                raise HTTPRefusal(413, f"the text is longer than {limits.text_bytes:,} bytes")
            self.text_parts[0] += data[start:end]
        elif "upload" in part:
            up = part["upload"]
            up.size += n
            if up.size > limits.file_bytes:
                raise HTTPRefusal(413, f"{up.filename}: larger than {limits.file_bytes:,} bytes "
                                       f"({limits.file_bytes >> 20} MB), the most one file may be")
            part["file"].write(data[start:end])
        elif "skip" in part and n:
            raise HTTPRefusal(400, "a file part with an empty file name has content")

    def on_part_end(self) -> None:
        if "file" in self.part:
            self.part.pop("file").close()

    def on_end(self) -> None:
        self.ended = True


def _video_format(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in head[:64]:
        return "webm"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _identify(up: _Upload, limits: UploadLimits) -> tuple[str, str]:
    """Decode ``up`` as what it claims to be: (the extension to store it under, the kind to show it as).
    Raises :class:`HTTPRefusal` (415) naming the file and what is accepted."""
    name = f"'{up.filename}'"
    if up.size == 0:
        raise HTTPRefusal(400, f"{up.kind} {name} is empty")
    if up.kind == "image":
        try:
            img = open_image_checked(up.path, name=name)
        except MediaError as e:
            raise HTTPRefusal(415 if "not an image" in str(e) else 400, str(e)) from None
        if img.format not in _IMAGE_FORMATS:
            raise HTTPRefusal(415, f"image {name} is {img.format}; send PNG, JPEG, GIF, WebP or BMP")
        return _IMAGE_FORMATS[img.format], "image"
    if up.kind == "audio":
        import soundfile as sf

        try:
            info = sf.info(str(up.path))
        except Exception:  # libsndfile's errors name the server's path: say it in our words
            raise HTTPRefusal(415, f"audio {name} is not audio this server reads; send WAV, FLAC, OGG or MP3") from None
        if info.format not in _AUDIO_FORMATS:
            raise HTTPRefusal(415, f"audio {name} is {info.format}; send WAV, FLAC, OGG or MP3")
        if info.frames <= 0 or info.samplerate <= 0:
            raise HTTPRefusal(400, f"audio {name} holds no samples")
        if info.frames / info.samplerate > limits.media_seconds:
            raise HTTPRefusal(413, f"audio {name} lasts {info.frames / info.samplerate:.0f} s; at most "
                                   f"{limits.media_seconds:g} s are accepted")
        return _AUDIO_FORMATS[info.format], "audio"
    with open(up.path, "rb") as f:
        fmt = _video_format(f.read(64))
    if fmt is None:
        raise HTTPRefusal(415, f"video {name} is not a video this server reads; send MP4, WebM or an animated GIF")
    if fmt == "gif":
        try:
            open_image_checked(up.path, name=name)
        except MediaError as e:
            raise HTTPRefusal(400, str(e).replace("image", "video", 1)) from None
        return "gif", "video"  # the page shows a .gif video with <img>: browsers play GIFs there
    try:
        import imageio.v3 as iio

        meta = iio.immeta(up.path, extension=f".{fmt}")  # the upload has no extension yet
        width, height = meta["size"]
        duration = float(meta.get("duration") or 0.0)
    except Exception:  # imageio/ffmpeg errors vary, and name the server's path
        raise HTTPRefusal(415, f"video {name} is not a video this server reads; send MP4, WebM or an animated GIF") from None
    try:
        check_image_size(int(width), int(height), name)
    except MediaError as e:
        raise HTTPRefusal(400, str(e).replace("image", "video frames of", 1)) from None
    if duration > limits.media_seconds:
        raise HTTPRefusal(413, f"video {name} lasts {duration:.0f} s; at most {limits.media_seconds:g} s are accepted")
    return fmt, "video"


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("cannot remove %s: %s", p, e)


# ==================================================================== the app
def create_app(pipe, media_dir: str | Path | None = None, seed: int | None = 0,
               max_new_tokens: int | None = None, allowed_hosts: Sequence[str] = LOCAL_HOSTS,
               limits: UploadLimits | None = None, max_sessions: int = 64,
               list_sessions: bool | None = None) -> Starlette:
    """The web app for ``pipe``. Uploads and generated media go under ``media_dir`` (default: a temp
    dir). It answers only to ``allowed_hosts`` (``"*"``: any); ``limits`` caps uploads.
    ``list_sessions``: whether ``GET /api/sessions`` lists the saved sessions (default: only when
    every allowed host is a local name, so that on a network a session is found only by its id)."""
    media_root = Path(media_dir) if media_dir is not None else Path(tempfile.mkdtemp(prefix="anymodal-ui-"))
    media_root.mkdir(parents=True, exist_ok=True)
    store = SessionStore(pipe, media_root, seed=seed, max_new_tokens=max_new_tokens, max_sessions=max_sessions)
    limits = limits or UploadLimits()
    if list_sessions is None:
        list_sessions = all(h.strip("[]").lower() in LOCAL_HOSTS for h in allowed_hosts)
    h = _Handlers(pipe, store, limits, media_root, list_sessions)
    routes = [
        Route("/", h.page),
        Route("/favicon.ico", h.favicon),
        Route("/static/page.js", h.script),
        Route("/static/page.css", h.style),
        Route("/api/sessions", h.new_session, methods=["POST"]),
        Route("/api/sessions", h.sessions, methods=["GET"]),
        Route("/api/sessions/{sid}", h.history),
        Route("/api/sessions/{sid}/send", h.send, methods=["POST"]),
        Route("/api/sessions/{sid}/stream", h.stream, methods=["POST"]),
        Route("/api/sessions/{sid}/stop", h.stop, methods=["POST"]),
        Route("/media/{sid}/{name}", h.media),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _no_route, 405: _no_route})
    app.state.store = store
    app.state.limits = limits
    app.add_middleware(_Guard, allowed_hosts=list(allowed_hosts))
    return app


async def _no_route(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        return _error(405, f"{request.method} is not allowed on {request.url.path[:100]}")
    return _error(status, "not found")


class _Handlers:
    """The app's route handlers, over its session store, upload limits and media directory."""

    def __init__(self, pipe: Any, store: SessionStore, limits: UploadLimits, media_root: Path,
                 list_sessions: bool = True) -> None:
        self.pipe = pipe
        self.store = store
        self.limits = limits
        self.media_root = media_root
        self.list_sessions = list_sessions
        self.accepts = sorted(m.value for m in pipe.config.input_projectors)
        makes = [m.value for m in pipe.generators]
        fields = {"__MODEL__": str(pipe.config.name), "__ACCEPTS__": ",".join(self.accepts),
                  "__TAKES__": ", ".join(["text", *(m.value for m in pipe.config.input_projectors)]), "__MAKES__": ", ".join(["text", *makes])}
        self.page_html = PAGE_HTML
        for key, value in fields.items():  # a config's name is the user's text: escaped, as every value
            self.page_html = self.page_html.replace(key, html.escape(value, quote=True))

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.page_html)

    async def favicon(self, request: Request) -> Response:
        return Response(_favicon(), media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    async def sessions(self, request: Request) -> Response:
        if not self.list_sessions:
            return JSONResponse({"listed": False, "sessions": []})
        return JSONResponse({"listed": True, "sessions": await run_in_threadpool(self.store.list_saved)})

    async def script(self, request: Request) -> Response:
        return Response(PAGE_JS, media_type="text/javascript")

    async def style(self, request: Request) -> Response:
        return Response(PAGE_CSS, media_type="text/css")

    async def new_session(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > 4096:
                return _error(413, "the body of POST /api/sessions is at most 4096 bytes (it takes no options)")
        if body.strip():
            try:
                options = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                return _error(400, f"the body is not valid JSON: {e}")
            if not isinstance(options, dict):
                return _error(400, f"the body must be a JSON object, not {type(options).__name__}")
            if options:
                return _error(400, f"unknown option(s) {', '.join(sorted(map(repr, options)))[:200]}; "
                                   "POST /api/sessions takes none")
        return JSONResponse({"id": self.store.create(), "accepts": self.accepts})

    async def history(self, request: Request) -> Response:
        with self.store.use(request.path_params["sid"]) as web:
            if web is None:
                return _error(404, NO_SESSION)
            # no web.lock here: a send holds it while the model runs, and this runs on the event loop
            return JSONResponse({"turns": [_turn_json(t, m) for t, m in zip(web.chat.turns, web.turn_media)]})

    async def send(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        with self.store.use(sid) as web:
            if web is None:
                return _error(404, NO_SESSION)
            uploads: list[_Upload] = []
            try:
                return await self._send(request, sid, web, uploads)
            except (HTTPRefusal, ClientDisconnect) as e:
                return self._refusal(e, uploads)
            finally:
                if not all(up.path.name in web.files for up in uploads):  # refused: keep none of them
                    _remove([up.path for up in uploads])

    def _refusal(self, e: Exception, uploads: list[_Upload]) -> Response:
        """The answer to a message refused before the model ran (/send and /stream alike)."""
        if isinstance(e, ClientDisconnect):
            return _error(400, "the client went away during the upload")
        return _error(e.status, _hide_paths(str(e), uploads, self.media_root))

    async def _send(self, request: Request, sid: str, web: _WebSession, uploads: list[_Upload]) -> Response:
        """Read the form into ``uploads``, keep each upload under its decoded kind, and generate the reply."""
        text, shown = await self._accept(request, web, uploads)
        try:
            return JSONResponse(await run_in_threadpool(self._reply, sid, web, text, uploads, shown))
        except (ValueError, TypeError, OSError) as e:  # MediaError is a ValueError
            raise HTTPRefusal(400, str(e)) from None

    async def stream(self, request: Request) -> Response:
        """``/send`` with the reply as server-sent events; the model's thread outlives the request
        (a page that goes away finds the turn saved when it comes back)."""
        sid = request.path_params["sid"]
        with self.store.use(sid) as web:
            if web is None:
                return _error(404, NO_SESSION)
            uploads: list[_Upload] = []
            try:
                text, shown = await self._accept(request, web, uploads)
            except (HTTPRefusal, ClientDisconnect) as e:
                _remove([up.path for up in uploads])
                return self._refusal(e, uploads)
            job = _Job(asyncio.get_running_loop())
            self.store.start_job(web, job)  # before `use` lets go: the session stays in memory until the turn ends
        asyncio.get_running_loop().run_in_executor(None, self._streamed_turn, sid, web, text, uploads, shown, job)
        return StreamingResponse(job.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _streamed_turn(self, sid: str, web: _WebSession, text: str, uploads: list[_Upload], shown: list[str],
                       job: _Job) -> None:
        """The model's side of ``/stream`` (a worker thread): the turn, then its last event."""
        try:
            job.emit("reply", self._reply(sid, web, text, uploads, shown, job))
        except _Stopped:
            job.emit("cancelled")
        except (ValueError, TypeError, OSError) as e:  # as /send answers them (400)
            job.emit("error", {"error": _hide_paths(str(e), uploads, self.media_root)})
        except Exception:
            logger.exception("generating a reply in session %s failed", sid)
            job.emit("error", {"error": "the model failed on this message (the server's log says why)"})
        finally:
            if not all(up.path.name in web.files for up in uploads):  # not kept by a turn: none of them
                _remove([up.path for up in uploads])
            self.store.end_job(web, job)
            job.emit(None)

    async def stop(self, request: Request) -> Response:
        with self.store.use(request.path_params["sid"]) as web:
            if web is None:
                return _error(404, NO_SESSION)
            return JSONResponse({"stopped": self.store.stop_jobs(web)})

    async def _accept(self, request: Request, web: _WebSession, uploads: list[_Upload]) -> tuple[str, list[str]]:
        """Read the form into ``uploads`` and keep each upload under its decoded kind: the text, and
        the kind each upload is shown as."""
        batch = uuid.uuid4().hex[:8]  # concurrent sends to one session must not share file names
        text = await _read_form(request, web.directory, batch, self.limits, uploads)
        counts: dict[str, int] = {}
        shown: list[str] = []
        for up in uploads:
            if _UPLOAD_KINDS[up.kind] not in self.pipe.config.input_projectors:
                raise HTTPRefusal(400, f"this model takes no {up.kind} input "
                                       f"(it takes {', '.join(self.accepts) or 'text only'})")
            ext, show = await run_in_threadpool(_identify, up, self.limits)
            final = web.directory / f"{batch}_user_{up.kind}_{counts.get(up.kind, 0)}.{ext}"
            counts[up.kind] = counts.get(up.kind, 0) + 1
            up.path.rename(final)
            up.path = final
            shown.append(show)
        return text, shown

    def _reply(self, sid: str, web: _WebSession, text: str, uploads: list[_Upload], shown: list[str],
               job: _Job | None = None) -> dict[str, Any]:
        """One turn of the conversation (in a worker thread, one at a time), saved with its media.
        With a ``job``, progress goes to it, and its Stop raises :class:`_Stopped` (the session is
        left as it was)."""
        paths = {m: [str(up.path) for up in uploads if up.kind == k] for k, m in _UPLOAD_KINDS.items()}
        hooks = {} if job is None else {"on_text": job.on_text, "on_step": job.on_step}
        with self.store.pinned(web), web.lock, self.store.generate_lock:
            if job is not None:
                job.check()  # stopped while it waited for another turn
                job.emit("start")
            reply = web.chat.send(text, images=paths[Modality.IMAGE] or None, audios=paths[Modality.AUDIO] or None,
                                  videos=paths[Modality.VIDEO] or None, **hooks)
            user_media = [web.add_file(sid, up.path, show) for up, show in zip(uploads, shown)]
            reply_media = _write_generated(web, sid, len(web.chat.turns), reply)
            web.turn_media += [user_media, reply_media]
            web.saved = False
            try:
                self.store.save(sid, web)
                web.saved = True
            except OSError as e:  # the previous save stays whole; the conversation goes on in memory
                logger.warning("cannot save session %s: %s", sid, e)
            return {"user": _turn_json(web.chat.turns[-2], user_media), "reply": _turn_json(reply, reply_media)}

    async def media(self, request: Request) -> Response:
        name = request.path_params["name"]
        with self.store.use(request.path_params["sid"]) as web:
            path = web.files.get(name) if web is not None else None
            if path is None or not path.is_file():
                return _error(404, "not found")
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            headers = {"Content-Security-Policy": MEDIA_CSP, "Cache-Control": "private, max-age=3600"}
            if ext in MEDIA_TYPES:
                return FileResponse(path, media_type=MEDIA_TYPES[ext], headers=headers, content_disposition_type="inline")
            # any other extension (a file kept under its sender's extension): a download, never rendered
            return FileResponse(path, media_type="application/octet-stream", headers=headers, filename=name,
                                content_disposition_type="attachment")


@functools.cache
def _favicon() -> bytes:
    """A 32-pixel icon drawn once: three dots (text, image, sound) on the header's dark square."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((0, 0, 31, 31), radius=7, fill=(29, 29, 31, 255))
    for x, colour in ((9, (96, 165, 250)), (16, (74, 222, 128)), (23, (251, 146, 60))):
        draw.ellipse((x - 3, 13, x + 3, 19), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="ICO", sizes=[(32, 32)])
    return buf.getvalue()


def _hide_paths(message: str, uploads: Sequence[_Upload], media_root: Path) -> str:
    """``message`` with each upload's server-side path replaced by the sender's file name, and the
    media directory cut from any other path under it."""
    for up in uploads:
        message = message.replace(str(up.path), up.filename)
    for root in dict.fromkeys((str(media_root.resolve()), str(media_root))):
        message = re.sub(re.escape(root) + r"/(?:[0-9a-f]{32}/)?", "", message)
    return message


def allowed_hosts_for(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host names a server bound to ``host`` answers to: the local names, ``host`` itself, and
    ``extra``; bound to every interface (``0.0.0.0``, ``::``), also this machine's own names."""
    hosts = list(LOCAL_HOSTS) + [host] + list(extra)
    if host in ("0.0.0.0", "::", ""):
        import socket

        names = {socket.gethostname(), socket.getfqdn()}
        for n in list(names):
            try:
                names |= {a[4][0] for a in socket.getaddrinfo(n, None)}
            except OSError:
                pass
        hosts += sorted(names)
    return list(dict.fromkeys(h for h in hosts if h))


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, seed: int | None = 0, media_dir: str | Path | None = None,
          max_new_tokens: int | None = None, allowed_hosts: Sequence[str] = ()) -> None:
    """Run the UI with uvicorn until interrupted; every connection keeps the deadlines of
    :mod:`anymodal.ui.deadlines` (a request head within 10 s, a whole request within 300 s)."""
    import uvicorn

    from .deadlines import server_config

    hosts = allowed_hosts_for(host, allowed_hosts)
    app = create_app(pipe, media_dir=media_dir, seed=seed, max_new_tokens=max_new_tokens, allowed_hosts=hosts)
    if host not in LOCAL_HOSTS:
        logger.warning("serving on %s: anyone who can reach this address can use the model", host)
    print(f"anymodal UI on http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C to stop); "
          f"it answers to the host names {', '.join(hosts)}")
    uvicorn.Server(server_config(app, host, port, log_level="warning")).run()
