"""ServerGuard: the one ASGI middleware that applies auth, roles, bind policy, request checks and upload
folders; and the 3D Slicer client's stale multipart boundary (fix 5)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

import jwt
from fastapi.responses import JSONResponse

from . import http_limits, uploads
from .auth import RealmUnavailable, role_level, token_roles, verify_token_async
from .bind import BindPolicy
from .checks import _checked, _query
from .roles import PUBLIC, ROLE_ORDER, match_route, required_role, role_names

logger = logging.getLogger(__name__)


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ServerGuard:
    """Auth and roles (401/403), bind policy, request checks (4xx) and per-request temp folders."""

    def __init__(self, app, policy: BindPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS":  # a plain OPTIONS (CORS preflights are answered before): the route's methods
            return await http_limits.options_answer(path)(scope, receive, send)
        role = required_role(method, path)
        refusal = await self._authorize(scope, method, path, role)
        if refusal is None and self.policy.refuses(method, path):
            refusal = (403, f"{method} {path} is refused: the server listens on {self.policy.host} without "
                            "auth; enable MONAI_LABEL_AUTH_ENABLE or serve on 127.0.0.1")
        if refusal is None:
            template = match_route(method, path)
            if template is not None:
                refusal = await asyncio.to_thread(_checked, method, template, path, _query(scope))
        if refusal is not None:
            status, message = refusal
            headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "5"}}.get(status)
            return await JSONResponse({"detail": message}, status_code=status, headers=headers)(scope, receive, send)

        if (method, match_route(method, path)) in FORM_ROUTES:  # only these read a form; others never wait
            receive = await _repair_multipart_boundary(scope, receive)
        holder = uploads._RequestTemp(uploads.UPLOAD_ROOT) if uploads.UPLOAD_ROOT is not None else None
        token = uploads._request_temp.set(holder)
        try:
            await self.app(http_limits.served_scope(scope), receive, _redacting(send, holder))
        finally:
            uploads._request_temp.reset(token)
            if holder is not None:  # after the answer and MONAI Label's background tasks
                holder.remove()

    async def _authorize(self, scope, method: str, path: str, role: str) -> tuple[int, str] | None:
        if not self.policy.auth or role == PUBLIC:
            if self.policy.auth and _bearer(scope):  # /auth/token/valid checks it in the loop: key cached first
                with contextlib.suppress(RealmUnavailable, jwt.InvalidTokenError):
                    await verify_token_async(_bearer(scope))
            return None
        token = _bearer(scope)
        if token is None:
            return 401, "a bearer token is required (Authorization: Bearer <access token>)"
        try:
            claims = await verify_token_async(token)
        except RealmUnavailable as e:
            logger.warning(str(e))
            return 503, "the identity provider cannot be reached or serves an unreadable key; try again later"
        except jwt.InvalidTokenError as e:
            return 401, f"invalid token: {e}"
        held = role_level(token_roles(claims))
        if held < ROLE_ORDER.index(role):
            return 403, f"{method} {path} needs the role {role_names()[role]!r}"
        return None


# routes whose handlers read a multipart form (the client's stale headers also reach GETs, which must not wait)
FORM_ROUTES = {("PUT", "/datastore/"), ("PUT", "/datastore/image"), ("PUT", "/datastore/label"),
               ("PUT", "/datastore/image/info"), ("PUT", "/datastore/label/info"),
               ("PUT", "/datastore/updatelabelinfo"), ("PUT", "/session/"), ("POST", "/infer/{model}"),
               ("POST", "/infer/wsi_v2/{model}"), ("PUT", "/model/{model}")}


async def _repair_multipart_boundary(scope, receive):
    """``monailabel.client`` 0.8.5 writes the content-type of its multipart requests into the client's own
    header dict once a token is set (``http_multipart`` updates ``headers`` in place); its next upload through
    ``requests`` (``create_session``, ``upload_image``) then sends that old boundary with a new body, and
    the server answers 400 "Invalid multipart data". The body's first line names its real boundary: the
    header is set from it. Other requests pass untouched."""
    headers = dict(scope.get("headers", []))
    content_type = headers.get(b"content-type", b"")
    if not content_type.lower().startswith(b"multipart/form-data"):
        return receive
    buffered, more = b"", True
    while more and b"\r\n" not in buffered and len(buffered) < 4096:
        message = await receive()
        if message["type"] != "http.request":
            return _replay(message, receive)
        buffered += message.get("body", b"")
        more = message.get("more_body", False)
    first_line = buffered.split(b"\r\n", 1)[0]
    claimed = re.search(rb'boundary="?([^";]+)"?', content_type)
    if first_line.startswith(b"--") and len(first_line) > 2 and (claimed is None or claimed.group(1) != first_line[2:]):
        fixed = b"multipart/form-data; boundary=" + first_line[2:]
        scope["headers"] = [(k, fixed if k == b"content-type" else v) for k, v in scope["headers"]]
    return _replay({"type": "http.request", "body": buffered, "more_body": more}, receive)


def _replay(first, receive):
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _redacting(send, holder: uploads._RequestTemp | None):
    """Error answers (status >= 400) with upload paths replaced, sent after the request's uploads were
    deleted (a refused upload is gone before the client hears of it); other answers untouched."""
    state: dict[str, Any] = {}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                state["start"], state["body"] = message, b""
                return None
            return await send(message)
        if message["type"] == "http.response.body" and "start" in state:
            state["body"] += message.get("body", b"")
            if message.get("more_body"):
                return None
            body = uploads.redact(state["body"].decode("utf-8", "replace")).encode()
            if holder is not None:
                holder.remove()
            start = state.pop("start")
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            return await send({"type": "http.response.body", "body": body})
        return await send(message)

    return wrapped

