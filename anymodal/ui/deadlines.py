"""Deadlines for every connection of ``anymodal serve``, kept by the HTTP protocol itself.

uvicorn arms no timer until a connection's first response is sent (``timeout_keep_alive`` starts
after it), and any byte received cancels that timer. So a client that sends an unfinished request
head, or one byte every 20 s (slowloris), held a connection, and a task, for as long as it liked.
The app cannot help: it is called only once the head is complete.

:class:`DeadlineProtocol` is uvicorn's h11 protocol with two more timers, armed when a connection
opens and again when each response is complete (the start of the next request):

* **header deadline**: the request head (request line and headers) must be complete within
  ``header_s``; otherwise the server answers ``408`` and closes the connection;
* **request deadline**: the whole request, head and body, must have arrived within ``request_s``;
  otherwise the connection is closed (with a ``408`` if no response has started). This bounds a
  body that trickles in too slowly for the upload idle timeout to notice.

A request whose body has arrived is not timed while the app works on it (a reply can take minutes).
The head's size is bounded by h11 (``h11_max_incomplete_event_size``, 16 KiB by default).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 300.0  # a 100 MB upload (the request cap) needs about 350 KB/s
KEEP_ALIVE_TIMEOUT_S = 5.0  # an idle connection between requests (uvicorn's default)


@dataclass(frozen=True)
class ConnectionDeadlines:
    header_s: float = HEADER_TIMEOUT_S
    request_s: float = REQUEST_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("header_s", "request_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"ConnectionDeadlines.{name} must be a positive number of seconds, got {value!r}")
        if self.request_s < self.header_s:
            raise ValueError(f"ConnectionDeadlines.request_s ({self.request_s}) must be at least header_s "
                             f"({self.header_s}): the request deadline includes the head")


def _timeout_response(message: str) -> bytes:
    body = message.encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def deadline_protocol(deadlines: ConnectionDeadlines) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with ``deadlines`` (pass it as ``uvicorn.Config(http=...)``)."""

    class DeadlineProtocol(H11Protocol):
        _deadlines = deadlines

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            self._request_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self._deadlines.header_s, self._expired, "header")
            self._request_timer = self.loop.call_later(self._deadlines.request_s, self._expired, "request")

        def _disarm(self, which: tuple[str, ...] = ("header", "request")) -> None:
            for name in which:
                timer = getattr(self, f"_{name}_timer", None)
                if timer is not None:
                    timer.cancel()
                    setattr(self, f"_{name}_timer", None)

        def _check_progress(self) -> None:
            state = self.conn.their_state
            if state is not h11.IDLE:  # the request line and headers have been parsed
                self._disarm(("header",))
            if state not in (h11.IDLE, h11.SEND_BODY):  # the whole request has arrived (or the connection ends)
                self._disarm(("request",))

        def handle_events(self) -> None:
            super().handle_events()
            self._check_progress()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadlines
                self._check_progress()  # a pipelined request may already be in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _expired(self, which: str) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            seconds = self._deadlines.header_s if which == "header" else self._deadlines.request_s
            what = "request head (request line and headers)" if which == "header" else "request"
            self.logger.warning("closing a connection from %s: its %s did not arrive within %g s",
                                self.client, what, seconds)
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_timeout_response(f"the {what} did not arrive within {seconds:g} s\n"))
            if self.cycle is not None:
                self.cycle.disconnected = True  # the app's receive() sees the client gone
                self.cycle.message_event.set()
            self.transport.close()

    return DeadlineProtocol


def server_config(app, host: str, port: int, deadlines: ConnectionDeadlines | None = None, **options):
    """A ``uvicorn.Config`` for ``app`` whose every connection keeps ``deadlines``."""
    import uvicorn

    deadlines = deadlines or ConnectionDeadlines()
    return uvicorn.Config(app, host=host, port=port, http=deadline_protocol(deadlines),
                          timeout_keep_alive=deadlines.keep_alive_s, **options)
