"""The one place where MONAI Label 0.8.5's server is fixed for this app (site-packages is never edited).

:func:`install` runs once in the server process, from ``main.py`` when MONAI Label's lifespan creates
the app (before uvicorn binds its socket). Each fix has a test in ``tests/test_server_auth.py`` or
``tests/test_bad_input.py`` that fails if the upstream behaviour it works around changes.

1. **Token check** (``monailabel/endpoints/user/auth.py`` calls ``jwt.decode`` without ``algorithms``,
   which PyJWT 2.x requires, so every token is refused): :func:`verify_token` checks an RS256 signature
   with the realm's public key (the realm URL's ``public_key``, as Keycloak serves it), the audience
   (``MONAI_LABEL_AUTH_CLIENT_ID``), the issuer (``MONAI_LABEL_AUTH_REALM_URI``) and the expiry.
   It replaces ``from_token``, so MONAI Label's own ``/auth/token/valid`` works too.
2. **Roles per route**: MONAI Label's per-endpoint RBAC is flat (a token must hold the exact role) and
   disagrees with an annotation team's needs (training needs admin, the dataset ZIP only annotator,
   model upload only annotator). :data:`ROUTE_ROLES` is the table used instead, with ordered roles
   (user < annotator < reviewer < admin); a route it does not list needs admin. Why a middleware rather
   than extra route dependencies: it sees every request, including routes outside the OpenAPI schema
   (``/reload``, ``/ohif``, ``/proxy``, ``/static``, ``/docs``), refuses before a handler or an upload
   body is touched, and does not depend on how FastAPI stores routes (0.165 wraps included routers).
   It sits inside MONAI Label's CORS middleware so that browsers also see 401/403 answers.
3. **Bind policy**: MONAI Label binds 0.0.0.0 by default. Without auth, a server started without an
   explicit ``--host`` binds 127.0.0.1 instead (uvicorn binds after the lifespan start-up, so its
   ``Config.host`` can still be changed here); on a non-loopback bind without auth, destructive routes
   (every DELETE and every admin route: dataset download, logs, model files) are refused with 403.
4. **Uploads**: MONAI Label writes uploads to ``tempfile.NamedTemporaryFile(...).name`` and deletes them
   only after a successful answer; the dataset ZIP is written with ``delete=False``. Each request gets
   its own private temp folder (a context variable read by ``tempfile.gettempdir``), removed when the
   request ends whatever happened; its path is replaced by ``<upload>`` in error answers and logs.
5. **3D Slicer's client with a token**: ``monailabel.client`` 0.8.5 sends a stale multipart boundary on
   uploads after its first multipart request once a token is set; the body's own boundary is used
   (:func:`_repair_multipart_boundary`).
6. **Status codes**: unknown trainer or scoring method -> 404 before anything is queued; DELETE / info
   of an unknown image or label -> 404; a dataset download with no labelled image -> 404; infer
   without an image -> 400; invalid JSON in a form field ->
   400; a login the identity provider refuses -> 401 (MONAI Label answers 200 then ERROR, 200 ``{}``
   or 500).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextvars
import gc
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import requests
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from monailabel.config import settings

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ roles
ROLE_ORDER = ("user", "annotator", "reviewer", "admin")
PUBLIC = "public"


def role_names() -> dict[str, str]:
    """Role level -> the role name tokens carry (MONAI Label's ``MONAI_LABEL_AUTH_ROLE_*`` settings)."""
    return {
        "user": settings.MONAI_LABEL_AUTH_ROLE_USER,
        "annotator": settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
        "reviewer": settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
        "admin": settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
    }


# (method, route path as in openapi.json) -> lowest role allowed. HEAD follows GET. Unlisted: admin.
ROUTE_ROLES: dict[tuple[str, str], str] = {
    # MONAI Label's login routes answer for themselves (/auth/token/valid checks the token itself)
    ("GET", "/auth/"): PUBLIC,
    ("POST", "/auth/token"): PUBLIC,
    ("GET", "/auth/token/valid"): PUBLIC,
    # reading
    ("GET", "/info/"): "user",
    ("GET", "/datastore/"): "user",
    ("GET", "/datastore/image"): "user",
    ("HEAD", "/datastore/image"): "user",
    ("GET", "/datastore/image/info"): "user",
    ("GET", "/datastore/label"): "user",
    ("HEAD", "/datastore/label"): "user",
    ("GET", "/datastore/label/info"): "user",
    ("GET", "/train/"): "user",
    ("GET", "/scoring/"): "user",
    ("GET", "/batch/infer"): "user",
    ("GET", "/session/{session_id}"): "user",
    ("GET", "/"): "user",
    ("GET", "/docs"): "user",
    ("GET", "/openapi.json"): "user",
    ("GET", "/favicon.ico"): "user",
    ("GET", "/static/{path:path}"): "user",
    ("GET", "/ohif/{path:path}"): "user",
    ("GET", "/proxy/dicom/wado/{path:path}"): "user",
    ("POST", "/proxy/dicom/wado/{path:path}"): "user",
    ("GET", "/proxy/dicom/qido/{path:path}"): "user",
    ("POST", "/proxy/dicom/qido/{path:path}"): "user",
    ("GET", "/proxy/dicom/{path:path}"): "user",
    ("POST", "/proxy/dicom/{path:path}"): "user",
    # annotating: infer, fetch samples, save labels, upload studies, sessions (3D Slicer's local volumes)
    ("POST", "/infer/{model}"): "annotator",
    ("POST", "/infer/wsi_v2/{model}"): "annotator",
    ("POST", "/activelearning/{strategy}"): "annotator",
    ("PUT", "/datastore/"): "annotator",
    ("PUT", "/datastore/image"): "annotator",
    ("PUT", "/datastore/image/info"): "annotator",
    ("PUT", "/datastore/label"): "annotator",
    ("PUT", "/datastore/label/info"): "annotator",
    ("PUT", "/datastore/updatelabelinfo"): "annotator",
    ("PUT", "/session/"): "annotator",
    ("DELETE", "/session/{session_id}"): "annotator",
    ("GET", "/proxy/dicom/stow/{path:path}"): "annotator",
    ("POST", "/proxy/dicom/stow/{path:path}"): "annotator",
    # reviewing: training, scoring, batch inference
    ("POST", "/train/"): "reviewer",
    ("POST", "/train/{model}"): "reviewer",
    ("DELETE", "/train/"): "reviewer",
    ("POST", "/scoring/"): "reviewer",
    ("POST", "/scoring/{method}"): "reviewer",
    ("DELETE", "/scoring/"): "reviewer",
    ("POST", "/batch/infer/{model}"): "reviewer",
    ("DELETE", "/batch/infer"): "reviewer",
    # administering: deleting, taking the whole dataset, logs, model files, reloading the app
    ("DELETE", "/datastore/"): "admin",
    ("DELETE", "/datastore/image"): "admin",
    ("DELETE", "/datastore/label"): "admin",
    ("GET", "/datastore/dataset"): "admin",
    ("GET", "/logs/"): "admin",
    ("GET", "/logs/gpu"): "admin",
    ("GET", "/model/{model}"): "admin",
    ("PUT", "/model/{model}"): "admin",
    ("DELETE", "/model/{model}"): "admin",
    ("GET", "/model/info/{model}"): "admin",
    ("POST", "/reload"): "admin",
}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[^}]+\})", template)
    rx = "".join((".*" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{rx}$")


_ROUTES = [(method, template, _template_regex(template)) for (method, template) in ROUTE_ROLES]


def match_route(method: str, path: str) -> str | None:
    """The route template of ROUTE_ROLES a request path falls under (literal templates win), or None."""
    methods = (method, "GET") if method == "HEAD" else (method,)
    hits = [t for m, t, rx in _ROUTES if m in methods and rx.match(path)]
    if not hits:
        return None
    return min(hits, key=lambda t: (t.count("{"), -len(t)))  # /infer/wsi_v2/{model} over /infer/{model}


def required_role(method: str, path: str) -> str:
    template = match_route(method, path)
    if template is None:
        return "admin"
    return ROUTE_ROLES.get((method, template)) or ROUTE_ROLES[("GET", template)]


def is_destructive(method: str, path: str) -> bool:
    """Refused on a non-loopback bind without auth: every DELETE and every admin route."""
    return method == "DELETE" or required_role(method, path) == "admin"


# ------------------------------------------------------------------------------------------ tokens
class RealmUnavailable(RuntimeError):
    """The realm's public key could not be fetched (the identity provider is down or misconfigured)."""


_KEY_TTL_S = 300.0
_key_cache: dict[str, tuple[float, str]] = {}
_key_lock = threading.Lock()


def realm_public_key(realm_uri: str, max_age_s: float = _KEY_TTL_S) -> str:
    """PEM public key served at the realm URL (``{"public_key": ...}``, as Keycloak does), cached 5 min."""
    with _key_lock:
        hit = _key_cache.get(realm_uri)
        if hit and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
    try:
        r = requests.get(realm_uri, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        r.raise_for_status()
        key = r.json()["public_key"]
    except (requests.RequestException, ValueError, KeyError) as e:
        raise RealmUnavailable(f"cannot read the realm's public key from {realm_uri}: {type(e).__name__}") from e
    pem = f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
    with _key_lock:
        _key_cache[realm_uri] = (time.monotonic(), pem)
    return pem


def verify_token(token: str) -> dict[str, Any]:
    """Claims of a valid access token; ``jwt.InvalidTokenError`` for a bad signature, audience, issuer,
    algorithm or an expired token."""
    realm = settings.MONAI_LABEL_AUTH_REALM_URI

    def decode(key: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            audience=settings.MONAI_LABEL_AUTH_CLIENT_ID,
            issuer=realm,
            options={"require": ["exp", "iss", "aud"]},
            leeway=10,  # clock skew between the identity provider and this server
        )

    try:
        return decode(realm_public_key(realm))
    except jwt.InvalidSignatureError:  # the realm may have rotated its key: read it again (at most every 30 s)
        return decode(realm_public_key(realm, max_age_s=30.0))


def token_roles(claims: dict[str, Any]) -> list[str]:
    """Role names at MONAI_LABEL_AUTH_TOKEN_ROLES (``realm_access#roles``: a ``#``-separated claim path)."""
    value: Any = claims
    for key in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return [r for r in value if isinstance(r, str)] if isinstance(value, list) else []


def role_level(roles: list[str]) -> int:
    """Index in ROLE_ORDER of the highest role held; -1 for none."""
    names = role_names()
    return max((i for i, level in enumerate(ROLE_ORDER) if names[level] in roles), default=-1)


def implied_role_names(roles: list[str]) -> list[str]:
    """The token's role and every lower one (an admin is also a reviewer, annotator and user)."""
    names = role_names()
    return [names[level] for level in ROLE_ORDER[: role_level(roles) + 1]]


def from_token(token: str):
    """Drop-in for ``monailabel.endpoints.user.auth.from_token`` with the token really checked."""
    from monailabel.endpoints.user.auth import DEFAULT_USER, User

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    try:
        claims = verify_token(token)
    except RealmUnavailable as e:
        raise jwt.InvalidTokenError(str(e)) from e
    return User(
        username=str(claims.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or claims.get("sub") or ""),
        email=claims.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=claims.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=implied_role_names(token_roles(claims)),
    )


def _rbac_checked_by_middleware():
    """RBAC.__call__ with the same signature (FastAPI reads it for the schema and for each request),
    which only authenticates: roles are ROUTE_ROLES, checked by ServerGuard."""
    from fastapi import Security
    from monailabel.endpoints.user.auth import User, get_current_user

    async def __call__(self, user: User = Security(get_current_user)) -> User:  # noqa: B008 (FastAPI idiom)
        return user

    return __call__


# ------------------------------------------------------------------------------------------ bind policy
def is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def start_server_host(argv: list[str]) -> tuple[str | None, bool]:
    """(host, explicit) as ``monailabel start_server`` parsed ``argv``: its own parser, with the host's
    default taken out so that an explicit ``--host 0.0.0.0`` is told apart from the default 0.0.0.0.
    (None, False) when the process was not started by ``start_server``."""
    from monailabel.main import Main

    parser = Main(actions=("start_server",)).args_parser()
    for action in parser._actions:  # argparse keeps sub-commands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            action.choices["start_server"].set_defaults(host=None)
    try:
        args, _ = parser.parse_known_args(argv[1:])
    except SystemExit:
        return None, False
    if getattr(args, "action", None) != "start_server":
        return None, False
    return (args.host, True) if args.host is not None else ("0.0.0.0", False)


def _uvicorn_configs() -> list:
    import uvicorn

    return [o for o in gc.get_objects() if isinstance(o, uvicorn.Config)]


@dataclass
class BindPolicy:
    host: str
    explicit: bool
    auth: bool

    @property
    def remote(self) -> bool:
        return not is_loopback(self.host)

    def refuses(self, method: str, path: str) -> bool:
        return self.remote and not self.auth and is_destructive(method, path)


def apply_bind_policy(argv: list[str], auth: bool) -> BindPolicy:
    """Decide where the server binds and what it refuses there; binds 127.0.0.1 when auth is off and
    no host was asked for. Raises RuntimeError when that cannot be ensured (the server then does not start)."""
    host, explicit = start_server_host(argv)
    configs = _uvicorn_configs()
    if host is None:  # not started by `monailabel start_server` (e.g. uvicorn directly): uvicorn's own host
        if len(configs) != 1:
            raise RuntimeError("MRAnnotator: cannot tell which address the server binds")
        return BindPolicy(host=str(configs[0].host), explicit=True, auth=auth)
    if not explicit and not auth:
        if len(configs) != 1:
            raise RuntimeError("MRAnnotator: auth is off and no --host was given; start with --host 127.0.0.1")
        configs[0].host = "127.0.0.1"
        logger.warning("MRAnnotator: auth is off and no --host was given: binding 127.0.0.1 only "
                       "(pass --host explicitly to serve other machines)")
        return BindPolicy(host="127.0.0.1", explicit=False, auth=auth)
    if not auth and not is_loopback(host):
        logger.warning(f"MRAnnotator: serving {host} without auth: DELETE, dataset download, logs and model "
                       "files are refused (enable MONAI_LABEL_AUTH_ENABLE to allow them to admins)")
    return BindPolicy(host=host, explicit=explicit, auth=auth)


# ------------------------------------------------------------------------------------------ uploads
@dataclass
class _RequestTemp:
    root: Path
    path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> str:
        with self.lock:
            if self.path is None:
                self.path = Path(_original_mkdtemp(prefix="req-", dir=self.root))
            return str(self.path)

    def remove(self) -> None:
        with self.lock:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None


_request_temp: contextvars.ContextVar[_RequestTemp | None] = contextvars.ContextVar("mrannotator_request_temp",
                                                                                     default=None)
_original_gettempdir = tempfile.gettempdir
_original_mkdtemp = tempfile.mkdtemp
UPLOAD_ROOT: Path | None = None


def _gettempdir() -> str:
    current = _request_temp.get()
    return current.get() if current is not None else _original_gettempdir()


def _gettempdirb() -> bytes:
    return os.fsencode(_gettempdir())


def request_upload_dir() -> Path | None:
    """This request's private temp folder, if it has written anything (uploads are written there)."""
    current = _request_temp.get()
    return current.path if current is not None else None


def is_request_upload(path: str) -> bool:
    """A file written under the upload folders (an upload of this or any other request)."""
    return UPLOAD_ROOT is not None and Path(path).resolve().is_relative_to(UPLOAD_ROOT)


def redact(text: str) -> str:
    """Upload file names (and their folder) replaced by ``<upload>``."""
    if UPLOAD_ROOT is None:
        return text
    return re.sub(re.escape(str(UPLOAD_ROOT)) + r"[^\s'\"),;]*", "<upload>", text)


class RedactUploads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if UPLOAD_ROOT is not None:
            message = record.getMessage()
            if str(UPLOAD_ROOT) in message:
                record.msg, record.args = redact(message), ()
        return True


# ------------------------------------------------------------------------------------------ request checks
def _query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


def precheck(method: str, template: str, path: str, query: dict[str, str]) -> tuple[int, str] | None:
    """(status, message) for a request MONAI Label would queue, store or answer wrongly; None if fine."""
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if (method, template) == ("POST", "/train/{model}") and last not in app._trainers:
        return 404, f"trainer {last!r} does not exist; choose from {', '.join(app._trainers)}"
    if (method, template) == ("POST", "/scoring/{method}") and last not in app._scoring_methods:
        return 404, f"scoring method {last!r} does not exist; choose from {', '.join(app._scoring_methods)}"
    if (method, template) == ("POST", "/infer/{model}") and not query.get("image") and not query.get("session_id"):
        return 400, "infer needs image=<datastore image id> (or session_id=<session>)"
    datastore = app.datastore()
    if (method, template) == ("GET", "/datastore/dataset") and not datastore.datalist():
        return 404, "the dataset has no labelled image yet: nothing to download"
    image = query.get("id") if method == "DELETE" else query.get("image")
    if (template in ("/datastore/image", "/datastore/") and method == "DELETE") or template == "/datastore/image/info":
        if image is not None and image not in datastore.list_images():
            return 404, f"image {image!r} is not in the datastore"
    if template in ("/datastore/label", "/datastore/label/info") and method in ("DELETE", "GET", "PUT"):
        label, tag = query.get("id") or query.get("label"), query.get("tag")
        if label is not None and tag is not None and not datastore.get_label_uri(label, tag):
            return 404, f"label {label!r} with tag {tag!r} is not in the datastore"
    return None


def _checked(method: str, template: str, path: str, query: dict[str, str]) -> tuple[int, str] | None:
    """:func:`precheck`, with the answer a datastore gives by raising (e.g. a PACS label that cannot be
    read: 422) turned into a refusal: the middleware sits outside FastAPI's exception handlers. Run in a
    worker thread: a PACS datastore answers over the network."""
    try:
        return precheck(method, template, path, query)
    except HTTPException as e:
        return e.status_code, str(e.detail)


# ------------------------------------------------------------------------------------------ middleware
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
        role = required_role(method, path)
        refusal = self._authorize(scope, method, path, role)
        if refusal is None and self.policy.refuses(method, path):
            refusal = (403, f"{method} {path} is refused: the server listens on {self.policy.host} without "
                            "auth; enable MONAI_LABEL_AUTH_ENABLE or serve on 127.0.0.1")
        if refusal is None:
            template = match_route(method, path)
            if template is not None:
                refusal = await asyncio.to_thread(_checked, method, template, path, _query(scope))
        if refusal is not None:
            status, message = refusal
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"detail": message}, status_code=status, headers=headers)(scope, receive, send)

        if (method, match_route(method, path)) in FORM_ROUTES:  # only these read a form; others never wait
            receive = await _repair_multipart_boundary(scope, receive)
        holder = _RequestTemp(UPLOAD_ROOT) if UPLOAD_ROOT is not None else None
        token = _request_temp.set(holder)
        try:
            await self.app(scope, receive, _redacting(send, holder))
        finally:
            _request_temp.reset(token)
            if holder is not None:  # after the answer and MONAI Label's background tasks
                holder.remove()

    def _authorize(self, scope, method: str, path: str, role: str) -> tuple[int, str] | None:
        if not self.policy.auth or role == PUBLIC:
            return None
        token = _bearer(scope)
        if token is None:
            return 401, "a bearer token is required (Authorization: Bearer <access token>)"
        try:
            claims = verify_token(token)
        except RealmUnavailable as e:
            logger.error(str(e))
            return 503, "the identity provider cannot be reached; try again later"
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


def _redacting(send, holder: _RequestTemp | None):
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
            body = redact(state["body"].decode("utf-8", "replace")).encode()
            if holder is not None:
                holder.remove()
            start = state.pop("start")
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            return await send({"type": "http.response.body", "body": body})
        return await send(message)

    return wrapped


async def _invalid_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"a form field (params/info) is not valid JSON: {exc.msg} at position {exc.pos}"},
                        status_code=400)


async def _identity_provider_refused(request: Request, exc: requests.HTTPError) -> JSONResponse:
    """MONAI Label's /auth/token forwards a refused login (wrong password) as a bare 500."""
    status = exc.response.status_code if exc.response is not None else 502
    if 400 <= status < 500:
        return JSONResponse({"detail": "the identity provider refused the login"}, status_code=401)
    return JSONResponse({"detail": f"the identity provider answered {status}"}, status_code=502)


# ------------------------------------------------------------------------------------------ install
_installed: BindPolicy | None = None


def server_app() -> FastAPI | None:
    """MONAI Label's FastAPI object when this process is the server (not a train/scoring subprocess)."""
    module = sys.modules.get("monailabel.app")
    return getattr(module, "app", None) if module is not None else None


def install(upload_root: Path) -> BindPolicy | None:
    """Apply every fix above to the running server (idempotent); None outside the server process."""
    global _installed, UPLOAD_ROOT
    fastapi_app = server_app()
    if fastapi_app is None:
        return None
    if _installed is not None:
        return _installed
    import monailabel.endpoints.user.auth as upstream_auth

    auth = bool(settings.MONAI_LABEL_AUTH_ENABLE)
    policy = apply_bind_policy(sys.argv, auth)

    upstream_auth.from_token = from_token  # get_current_user looks it up at call time
    upstream_auth.RBAC.__call__ = _rbac_checked_by_middleware()  # roles: ROUTE_ROLES, checked by ServerGuard

    shutil.rmtree(upload_root, ignore_errors=True)  # folders of requests cut short by a killed server
    upload_root.mkdir(parents=True, mode=0o700)
    atexit.register(shutil.rmtree, upload_root, ignore_errors=True)
    UPLOAD_ROOT = upload_root.resolve()
    tempfile.gettempdir, tempfile.gettempdirb = _gettempdir, _gettempdirb
    redactor = RedactUploads()
    for lg in [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]:
        for handler in getattr(lg, "handlers", []):
            if redactor not in handler.filters:
                handler.addFilter(redactor)

    _declare_roles_in_openapi(fastapi_app)
    fastapi_app.add_exception_handler(json.JSONDecodeError, _invalid_json)
    fastapi_app.add_exception_handler(requests.HTTPError, _identity_provider_refused)
    # The stack was built for the lifespan call already; insert ours inside CORS and rebuild it.
    fastapi_app.user_middleware.append(_middleware(ServerGuard, policy=policy))
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    _installed = policy
    logger.info(f"MRAnnotator server guard: auth {'on' if auth else 'off'}, bind {policy.host}"
                f"{' (explicit)' if policy.explicit else ''}")
    return policy


def _declare_roles_in_openapi(fastapi_app: FastAPI) -> None:
    """openapi.json: each operation's role from ROUTE_ROLES as ``x-required-role`` (MONAI Label's own
    ``|RBAC: ...|`` summaries state its flat roles, which are not the ones enforced here)."""
    build = fastapi_app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        names = role_names()
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                role = required_role(method.upper(), path)
                operation["x-required-role"] = PUBLIC if role == PUBLIC else names[role]
                operation["summary"] = re.sub(r"^\|RBAC: [^|]*\|\s*-?\s*", "", operation.get("summary", ""))
        return schema

    fastapi_app.openapi = openapi
    fastapi_app.openapi_schema = None


def _middleware(cls, **kwargs):
    from starlette.middleware import Middleware

    return Middleware(cls, **kwargs)


def upload_root(port: int) -> Path:
    """Where requests' temp folders go: one per user and port, so a restarted server clears its own."""
    return Path(_original_gettempdir()) / f"mrannotator-uploads-{os.getuid()}-{port}"
