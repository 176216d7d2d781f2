"""A small Starlette app over :class:`~anymodal.session.ChatSession` objects, and one HTML page.

Routes:
    GET  /                          the page
    POST /api/sessions              start a session -> {"id": ...}
    GET  /api/sessions/{id}         its turns
    POST /api/sessions/{id}/send    multipart form: ``text``, ``image``, ``audio`` and ``video`` files (repeatable)
                                    -> {"user": turn, "reply": turn}
    GET  /media/{id}/{name}         an uploaded or generated file of that session

A turn is ``{"role", "text", "media": [{"kind": "image"|"audio"|"video", "url"}]}``; ``text`` marks
each medium with its placeholder. Each session lives in ``media_dir/<id>/``: its uploads and
generated files, and after every turn the saved :class:`ChatSession` (``session/``, swapped in
whole) and what the page shows (``web.json``). Up to ``max_sessions`` are kept in memory; any other
is loaded from its directory when asked for, so a server restarted on the same ``media_dir``
carries on its conversations. One reply is generated at a time, because a pipeline is not safe to
call from several threads at once.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..media import save_image, save_video
from ..modality import Modality
from ..session import ChatSession, Turn
from ..utils import atomic_write_text
from .page import PAGE

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
_UPLOAD_KINDS = {"image": Modality.IMAGE, "audio": Modality.AUDIO, "video": Modality.VIDEO}
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex: nothing else names a session directory
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9]{1,8})?$")  # the names the server gives files
WEB_FILE = "web.json"


@dataclass
class _WebSession:
    chat: ChatSession
    directory: Path
    files: dict[str, Path] = field(default_factory=dict)  # served name -> path; nothing else is served
    turn_media: list[list[dict[str, str]]] = field(default_factory=list)  # per turn: [{"kind", "url"}]

    def add_file(self, sid: str, path: Path, kind: str) -> dict[str, str]:
        self.files[path.name] = path
        return {"kind": kind, "url": f"/media/{sid}/{path.name}"}


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
        self._keep(sid, _WebSession(ChatSession(self.pipe, seed=self.seed, max_new_tokens=self.max_new_tokens),
                                    directory))
        return sid

    def _keep(self, sid: str, web: _WebSession) -> _WebSession:
        with self._lock:
            web = self.sessions.setdefault(sid, web)  # two requests loading one session keep one copy
            self.sessions.move_to_end(sid)
            while len(self.sessions) > self.max_sessions:
                old_id, _ = self.sessions.popitem(last=False)
                logger.info("unloading the least recently used session %s (it stays on disk)", old_id)
        return web

    def get(self, sid: str) -> _WebSession | None:
        """The session ``sid``: from memory, else from its directory (``None`` if it has none)."""
        with self._lock:
            web = self.sessions.get(sid)
            if web is not None:
                self.sessions.move_to_end(sid)
                return web
        if not _SESSION_ID.match(sid) or not (self.media_dir / sid / WEB_FILE).is_file():
            return None
        try:
            web = self._load(sid)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("cannot load session %s from %s: %s", sid, self.media_dir / sid, e)
            return None
        return self._keep(sid, web)

    def save(self, sid: str, web: _WebSession) -> None:
        """Write the session (after a turn): the chat first, then what the page shows."""
        web.chat.save(web.directory / "session")
        atomic_write_text(web.directory / WEB_FILE, json.dumps(
            {"turn_media": web.turn_media, "files": sorted(web.files)}, indent=1) + "\n")

    def _load(self, sid: str) -> _WebSession:
        directory = self.media_dir / sid
        state = json.loads((directory / WEB_FILE).read_text())
        chat = ChatSession.load(directory / "session", self.pipe)
        turn_media = [list(m) for m in state["turn_media"]][: len(chat.turns)]
        turn_media += [[] for _ in range(len(chat.turns) - len(turn_media))]  # a save cut between the two files
        files = {name: directory / name for name in state["files"]
                 if _SAFE_NAME.match(name) and (directory / name).is_file()}
        return _WebSession(chat, directory, files, turn_media)


def _turn_json(turn: Turn, media: list[dict[str, str]]) -> dict[str, Any]:
    return {"role": turn.role, "text": turn.text, "media": media}


def _write_generated(web: _WebSession, sid: str, number: int, reply: Turn) -> list[dict[str, str]]:
    media = []
    for k, img in enumerate(reply.images):
        media.append(web.add_file(sid, save_image(img, web.directory / f"{number:03d}_reply_image_{k}.png"), "image"))
    for k, aud in enumerate(reply.audios):
        media.append(web.add_file(sid, aud.save(web.directory / f"{number:03d}_reply_audio_{k}.wav"), "audio"))
    for k, vid in enumerate(reply.videos):
        # shown with <img>: an animated GIF plays in every browser without a codec
        media.append(web.add_file(sid, save_video(vid, web.directory / f"{number:03d}_reply_video_{k}.gif"), "video"))
    return media


def create_app(pipe, media_dir: str | Path | None = None, seed: int | None = 0,
               max_new_tokens: int | None = None) -> Starlette:
    """The web app for ``pipe``. Uploads and generated media go under ``media_dir`` (default: a temp dir)."""
    media_root = Path(media_dir) if media_dir is not None else Path(tempfile.mkdtemp(prefix="anymodal-ui-"))
    media_root.mkdir(parents=True, exist_ok=True)
    store = SessionStore(pipe, media_root, seed=seed, max_new_tokens=max_new_tokens)
    accepts = sorted(m.value for m in pipe.config.input_projectors)

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.replace("__ACCEPTS__", ",".join(accepts)))

    async def new_session(request: Request) -> Response:
        return JSONResponse({"id": store.create(), "accepts": accepts})

    async def history(request: Request) -> Response:
        web = store.get(request.path_params["sid"])
        if web is None:
            return JSONResponse({"error": "no such session (the server may have restarted)"}, status_code=404)
        return JSONResponse({"turns": [_turn_json(t, m) for t, m in zip(web.chat.turns, web.turn_media)]})

    async def send(request: Request) -> Response:
        sid = request.path_params["sid"]
        web = store.get(sid)
        if web is None:
            return JSONResponse({"error": "no such session (the server may have restarted)"}, status_code=404)
        form = await request.form(max_files=32, max_fields=8)
        text = form.get("text") or ""
        if not isinstance(text, str):
            return JSONResponse({"error": "'text' must be a form field, not a file"}, status_code=400)
        batch = uuid.uuid4().hex[:8]  # concurrent sends to one session must not share file names
        uploads: dict[Modality, list[str]] = {}
        user_media: list[dict[str, str]] = []
        for kind, modality in _UPLOAD_KINDS.items():
            for k, item in enumerate(form.getlist(kind)):
                if not isinstance(item, UploadFile) or not item.filename:
                    continue
                data = await item.read()
                if len(data) > MAX_UPLOAD_BYTES:
                    return JSONResponse({"error": f"{item.filename}: larger than {MAX_UPLOAD_BYTES >> 20} MB"},
                                        status_code=413)
                suffix = Path(item.filename).suffix.lower()
                suffix = suffix if _SUFFIX.match(suffix) else ""
                path = web.directory / f"{batch}_user_{kind}_{k}{suffix}"
                path.write_bytes(data)
                uploads.setdefault(modality, []).append(str(path))
                user_media.append(web.add_file(sid, path, "image" if kind == "video" and suffix == ".gif" else kind))

        def generate() -> dict[str, Any]:
            with store.generate_lock:
                reply = web.chat.send(text, images=uploads.get(Modality.IMAGE), audios=uploads.get(Modality.AUDIO),
                                      videos=uploads.get(Modality.VIDEO))
                reply_media = _write_generated(web, sid, len(web.chat.turns), reply)
                web.turn_media += [user_media, reply_media]
                try:
                    store.save(sid, web)
                except OSError as e:  # the previous save stays whole; the conversation goes on in memory
                    logger.warning("cannot save session %s: %s", sid, e)
                return {"user": _turn_json(web.chat.turns[-2], user_media), "reply": _turn_json(reply, reply_media)}

        try:
            return JSONResponse(await run_in_threadpool(generate))
        except (ValueError, TypeError, OSError) as e:  # MediaError is a ValueError
            return JSONResponse({"error": str(e)}, status_code=400)

    async def media(request: Request) -> Response:
        web = store.get(request.path_params["sid"])
        path = web.files.get(request.path_params["name"]) if web is not None else None
        if path is None or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path)

    routes = [
        Route("/", page),
        Route("/api/sessions", new_session, methods=["POST"]),
        Route("/api/sessions/{sid}", history),
        Route("/api/sessions/{sid}/send", send, methods=["POST"]),
        Route("/media/{sid}/{name}", media),
    ]
    app = Starlette(routes=routes)
    app.state.store = store
    return app


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, seed: int | None = 0, media_dir: str | Path | None = None,
          max_new_tokens: int | None = None) -> None:
    """Run the UI with uvicorn until interrupted."""
    import uvicorn

    app = create_app(pipe, media_dir=media_dir, seed=seed, max_new_tokens=max_new_tokens)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the model", host)
    print(f"anymodal UI on http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
