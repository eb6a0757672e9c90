"""HTTP hygiene below FastAPI: timeouts, a cap on open connections, size caps answered with a status.

uvicorn's h11 protocol (what MONAI Label 0.8.5's ``uvicorn.run`` gets without httptools) closes a
keep-alive socket after ``timeout_keep_alive`` but never a socket that sends nothing or sends its headers
slowly; a request head over 16 KiB is answered 400 and the socket is closed while the client still writes
(a connection reset for a 1 MB query string or a 200 KB token); ``limit_concurrency`` counts idle sockets,
so idle sockets make it refuse real requests. :class:`GuardedH11Protocol` (set as the server's protocol
by :func:`install`, before uvicorn binds) adds, per connection:

- idle timeout: a socket with no request in progress is closed after ``idle_timeout_s`` (also a fresh one);
- header timeout: a request head must be complete ``header_timeout_s`` after its first byte (else 408);
- body timeout: a request body must not stall more than ``body_timeout_s`` between chunks (then closed);
- size caps: a request line over ``max_request_line`` bytes gets 414, a head over ``max_head`` bytes 431,
  with a JSON ``detail``; the rest of what the client sends is read and dropped for a few seconds, so it
  reads the answer instead of a reset;
- open connections: at ``max_connections``, a new connection closes the longest-idle one (idle sockets
  cannot lock real clients out); if none is idle, it gets 503.

Settings: ``MRANNOTATOR_HTTP_{IDLE,HEADER,BODY}_TIMEOUT_S``, ``MRANNOTATOR_HTTP_MAX_CONNECTIONS``,
``MRANNOTATOR_HTTP_MAX_REQUEST_LINE``, ``MRANNOTATOR_HTTP_MAX_HEAD`` (bytes).

HEAD and OPTIONS (:func:`served_scope`, :func:`options_answer`): FastAPI answers 405 to HEAD on a GET
route and to a plain OPTIONS; HEAD is served as GET (uvicorn drops the body), OPTIONS gets 204 and
``Allow``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import ClassVar

import h11
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from .roles import ROUTE_ROLES, match_route

logger = logging.getLogger(__name__)

_LINGER_S = 3.0  # after a refusal, what the client still sends is read and dropped this long
_LINGER_BYTES = 16 * 1024 * 1024
_HEAD_END = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class HttpLimits:
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    max_request_line: int = 32 * 1024
    max_head: int = 64 * 1024

    @classmethod
    def from_env(cls) -> HttpLimits:
        values = {}
        for f in fields(cls):
            name = "MRANNOTATOR_HTTP_" + f.name.upper()
            raw = os.environ.get(name, "").strip()
            if not raw:
                continue
            try:
                value = float(raw) if f.type == "float" else int(raw)
            except ValueError as e:
                raise ValueError(f"{name}={raw!r} is not a number") from e
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be > 0")
            values[f.name] = value
        return cls(**values)


def install(configs: list, limits: HttpLimits | None = None) -> HttpLimits:
    """Serve every uvicorn ``Config`` of this process with :class:`GuardedH11Protocol` (before it binds)."""
    limits = limits or HttpLimits.from_env()
    GuardedH11Protocol.limits = limits
    for config in configs:
        config.timeout_keep_alive = limits.idle_timeout_s
        config.h11_max_incomplete_event_size = 2 * limits.max_head  # our own cap answers first
        config.http_protocol_class = GuardedH11Protocol
    return limits


def raw_answer(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection (for requests h11 has not parsed)."""
    body = json.dumps({"detail": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    limits: ClassVar[HttpLimits] = HttpLimits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head = bytearray()
        self._head_timer = self._body_timer = self._linger_timer = None
        self._refused = False
        self._discarded = 0
        self._idle_since = self.loop.time()
        # a socket that never sends a byte is idle too (uvicorn only times out after a response)
        self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout_s, self.timeout_keep_alive_handler)
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # read and dropped, so that the client reads our answer rather than a reset
            self._discarded += len(data)
            if self._discarded > _LINGER_BYTES:
                self.transport.close()
            return
        if self.conn.their_state is h11.IDLE:
            refusal = self._oversized(data)
            if refusal is not None:
                return self.refuse(*refusal)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        super().data_received(data)
        self._track_request_state()

    # ----------------------------------------------------------------------------------- internals
    def _oversized(self, data: bytes) -> tuple[int, str] | None:
        self._head += data
        line_end = self._head.find(b"\n")
        if (line_end if line_end >= 0 else len(self._head)) > self.limits.max_request_line:
            return 414, (f"the request line (URL with its query string) is over {self.limits.max_request_line} "
                         "bytes: send long parameters in the request body")
        head_end = _HEAD_END.search(self._head)
        if (head_end.start() if head_end else len(self._head)) > self.limits.max_head:
            return 431, f"the request headers are over {self.limits.max_head} bytes in all"
        return None

    def _track_request_state(self) -> None:
        state = self.conn.their_state
        if state is not h11.IDLE:  # the head is complete
            self._head.clear()
            self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        if state is h11.SEND_BODY and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close, reading (and dropping) what the client still sends for a while."""
        self._refused = True
        self._head.clear()
        self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        logger.warning(f"HTTP {status} to {self.client}: {message}")
        self.transport.write(raw_answer(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(_LINGER_S, self.transport.close)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self._refused:
            self.refuse(408, f"the request headers did not arrive within {self.limits.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.flow.read_paused:  # the server stopped reading, not the client sending
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
            return
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            logger.warning(f"closing {self.client}: the request body stalled for {self.limits.body_timeout_s:g} s")
            self.transport.close()

    def is_idle(self) -> bool:
        """No request being handled (fresh, keep-alive, or a head still arriving)."""
        return not self._refused and (self.cycle is None or self.cycle.response_complete)

    def _make_room(self) -> None:
        if len(self.connections) <= self.limits.max_connections:
            return
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c.is_idle()
                and not c.transport.is_closing()]
        if idle:
            victim = min(idle, key=lambda c: c._idle_since)
            victim.transport.close()
        else:
            self.refuse(503, f"the server has {self.limits.max_connections} connections open; try again later")


def _cancelled(timer):
    if timer is not None:
        timer.cancel()
    return None


# ------------------------------------------------------------------------------------- HEAD and OPTIONS
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")


def served_scope(scope):
    """A HEAD on a route declared for GET only reaches the app as GET (uvicorn keeps the HEAD and sends
    no body); other requests unchanged."""
    if scope["method"] != "HEAD":
        return scope
    template = match_route("HEAD", scope["path"])
    if template is None or ("HEAD", template) in ROUTE_ROLES:
        return scope
    return {**scope, "method": "GET"}


def options_answer(path: str) -> Response:
    """The answer to a plain OPTIONS (CORS preflights are answered before): 204 with ``Allow``."""
    allowed = [m for m in _METHODS if match_route(m, path) is not None]
    if not allowed:
        return JSONResponse({"detail": f"no route {path}"}, status_code=404)
    return Response(status_code=204, headers={"Allow": ", ".join([*allowed, "OPTIONS"])})
