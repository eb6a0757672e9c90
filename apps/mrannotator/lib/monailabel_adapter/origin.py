"""Cross-site requests: CORS off unless allow-listed, forged state changes refused (issue 20).

MONAI Label 0.8.5 installs CORS for any origin with credentials (``MONAI_LABEL_CORS_ORIGINS`` empty
means ``*``) and allows every method in a preflight: a page on any site could delete a study on an
annotator's loopback server and read its images. Here:

- CORS is off by default: the OHIF the server serves is same-origin and needs none. Sites that need
  it are listed in ``MRANNOTATOR_CORS_ORIGINS`` (comma-separated, e.g.
  ``https://viewer.example.org,http://10.0.0.5:3000``); only they get CORS headers. A cross-origin GET
  gets no ``Access-Control-Allow-Origin``, so a page on another site cannot read the answer.
  (MONAI Label's own ``MONAI_LABEL_CORS_ORIGINS`` cannot be used: with pydantic 2, ``monailabel
  start_server`` fails on it, "Object of type AnyHttpUrl is not JSON serializable".)
- A state-changing request (any method but GET, HEAD, OPTIONS) is refused with 403 when a browser
  says it comes from another site: an ``Origin`` that is neither this server nor allow-listed
  (``null`` included), or no ``Origin`` and ``Sec-Fetch-Site: cross-site`` / ``same-site`` (another
  port on the same host is another origin). Checked before auth, so it holds without auth too.
  Clients that are no browser (3D Slicer, scripts) send neither header and are not affected.
- On a loopback bind without auth, a ``Host`` that is not a loopback name is refused (403): a
  DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) would otherwise be same-origin with the
  server. With auth such a page has no token; and an authenticating reverse proxy in front of a loopback
  server (apps/mrannotator/README.md) passes the public host name on.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from .bind import is_loopback

logger = logging.getLogger(__name__)

CORS_SETTING = "MRANNOTATOR_CORS_ORIGINS"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalised_origin(value: str) -> str | None:
    """``scheme://host:port`` (lower case, port explicit) of an origin or URL; None if it is none."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    host = parts.hostname.lower()
    return f"{parts.scheme.lower()}://{f'[{host}]' if ':' in host else host}:{port}"


def allowed_origins() -> frozenset[str]:
    """MRANNOTATOR_CORS_ORIGINS, normalised (empty: no CORS at all); an entry that is no origin stops
    the start with a message (a typo must not silently leave a site out or let every site in)."""
    out = set()
    for entry in os.environ.get(CORS_SETTING, "").split(","):
        if entry.strip():
            origin = normalised_origin(entry)
            if origin is None or urlsplit(entry.strip()).path.strip("/"):
                raise ValueError(f"{CORS_SETTING}: {entry.strip()!r} is not an origin (scheme://host[:port])")
            out.add(origin)
    return frozenset(out)


def _headers(scope) -> dict[bytes, str]:
    return {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _host_and_port(scope, headers: dict[bytes, str]) -> tuple[str, int | None]:
    host = headers.get(b"host", "")
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def _same_origin(origin: str, scope, headers: dict[bytes, str]) -> bool:
    """``origin`` names the host (and port) this request was sent to. Without a port in Host (a
    reverse proxy in front), the host alone is compared: the scheme there is the proxy's."""
    host, port = _host_and_port(scope, headers)
    parts = urlsplit(origin)
    if not host or parts.hostname != host:
        return False
    return port is None or parts.port == port


def cross_site_refusal(scope, allowed: frozenset[str], check_host: bool) -> str | None:
    """Why this request is refused as cross-site (403), or None."""
    headers = _headers(scope)
    if check_host:
        host, _ = _host_and_port(scope, headers)
        if host and not (is_loopback(host.strip("[]")) or host.endswith(".localhost")):
            return (f"Host {host!r} is not this loopback server's address (a page on another site, through DNS "
                    "rebinding?); use http://127.0.0.1:PORT or http://localhost:PORT")
    if scope["method"] in SAFE_METHODS:
        return None
    origin = headers.get(b"origin")
    if origin is not None:
        normal = normalised_origin(origin)
        if normal is not None and (_same_origin(normal, scope, headers) or normal in allowed):
            return None
        return (f"{scope['method']} from the page at {origin!r} is refused: it is neither this server nor listed "
                "in MRANNOTATOR_CORS_ORIGINS")
    site = headers.get(b"sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"{scope['method']} from a {site} page is refused (Sec-Fetch-Site: {site}, no Origin)"
    return None


class OriginGuard:
    """Outermost middleware: refuses cross-site requests as described in the module docstring."""

    def __init__(self, app, allowed: frozenset[str], check_host: bool):
        self.app = app
        self.allowed = allowed
        self.check_host = check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = cross_site_refusal(scope, self.allowed, self.check_host)
            if refusal is not None:
                logger.warning(f"refused {scope['method']} {scope['path']}: {refusal}")
                return await JSONResponse({"detail": refusal}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def install(fastapi_app, check_host: bool) -> frozenset[str]:
    """Replace MONAI Label's any-origin CORS with the allow-list (or none) behind OriginGuard; returns
    the allow-list. ``check_host``: the DNS-rebinding check (loopback bind, auth off). The caller
    rebuilds the middleware stack."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    allowed = allowed_origins()
    kept = [m for m in fastapi_app.user_middleware if m.cls is not CORSMiddleware]
    if allowed:  # CORSMiddleware compares the Origin header as sent: no explicit default port there
        sent = [o.removesuffix(":443") if o.startswith("https:") else o.removesuffix(":80") for o in allowed]
        kept.insert(0, Middleware(CORSMiddleware, allow_origins=sorted(sent), allow_credentials=True,
                                  allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"], allow_headers=["*"]))
    fastapi_app.user_middleware[:] = [Middleware(OriginGuard, allowed=allowed, check_host=check_host)] + kept
    logger.info(f"cross-origin requests: CORS for {sorted(allowed) or 'no other site'}; cross-site "
                "state changes refused")
    return allowed
