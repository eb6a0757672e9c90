"""The DICOMweb proxy (``/proxy/dicom/...``) limited to what OHIF needs, replacing MONAI Label's.

MONAI Label 0.8.5's ``proxy_dicom`` appends whatever path it is given to the PACS URL and forwards
every method with the server's PACS credentials, the caller's own headers (its token, its cookies)
included: ``/proxy/dicom/..%2F..%2Fsystem`` or ``POST /proxy/dicom/..%2F..%2Ftools%2Fshutdown``
reach the PACS outside its DICOMweb root, with a read-only token. It also drops the query string,
blocks the event loop, waits without a timeout and passes the PACS's ``WWW-Authenticate`` on.

Here a request is forwarded only when its path, fully percent-decoded, is one of the DICOMweb
resources below (UIDs are digits and dots, frame lists digits and commas): QIDO searches, WADO-RS
metadata / instances / frames / rendered / thumbnails / bulk data, and STOW of studies (POST; its
role, annotator, is in roles.ROUTE_ROLES). Anything else is 400 with the reason, before the PACS is
contacted. The query is rebuilt with ``includefield`` split into one parameter per attribute (OHIF
sends ``includefield=00081030%2C00080060``; Orthanc's DICOMweb plugin ignores an encoded comma).
Only ``Accept`` and ``Content-Type`` go to the PACS; only content headers come back. A PACS that is
down, too slow or refusing the server's credentials is 503 with a message (lib/pacs.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import parse_qsl, quote, unquote

import requests
from fastapi.responses import JSONResponse, Response

from lib.pacs import UNAVAILABLE, health_for, pacs_error, problem, timeouts

logger = logging.getLogger(__name__)

_UID = r"[0-9]+(?:\.[0-9]+)*"
_INSTANCE = rf"studies/{_UID}/series/{_UID}/instances/{_UID}"
QIDO = [re.compile(rf"^{p}$") for p in (
    "studies", "series", "instances", rf"studies/{_UID}/series", rf"studies/{_UID}/instances",
    rf"studies/{_UID}/series/{_UID}/instances")]
WADO = [re.compile(rf"^{p}$") for p in (
    rf"studies/{_UID}/metadata", rf"studies/{_UID}/series/{_UID}/metadata", rf"{_INSTANCE}/metadata",
    _INSTANCE, rf"{_INSTANCE}/frames/[0-9]+(?:,[0-9]+)*(?:/rendered|/thumbnail)?",
    rf"{_INSTANCE}/(?:rendered|thumbnail)", rf"studies/{_UID}/series/{_UID}/(?:rendered|thumbnail)",
    rf"{_INSTANCE}/bulk/[0-9A-Fa-f]{{8}}(?:/[0-9]+/[0-9A-Fa-f]{{8}})*")]
STOW = [re.compile(rf"^{p}$") for p in ("studies", rf"studies/{_UID}")]
MAX_QUERY = 8192
FORWARDED_REQUEST = ("accept", "content-type")
RETURNED = ("content-type", "etag", "last-modified", "cache-control", "warning")


class ProxyRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def dicomweb_resource(method: str, path: str) -> tuple[str, str]:
    """(kind, path) of a request to forward: kind is qido, wado or stow, path relative to the
    DICOMweb root; ProxyRefused(400) for anything else."""
    decoded = path
    for _ in range(4):  # %252F -> %2F -> /: whatever the PACS would decode, decoded here first
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    else:
        raise ProxyRefused(400, f"the DICOMweb path {path!r} is encoded more than 3 times")
    parts = decoded.replace("\\", "/").split("/")
    if any(p in (".", "..") for p in parts):
        raise ProxyRefused(400, f"the DICOMweb path {path!r} contains '..' or '.': the proxy serves only the "
                                "PACS's DICOMweb resources")
    if "\x00" in decoded or decoded.startswith("/") or "//" in decoded:
        raise ProxyRefused(400, f"the DICOMweb path {path!r} has an empty segment, NUL or a leading '/'")
    tables = {"POST": [("stow", STOW)], "GET": [("qido", QIDO), ("wado", WADO)]}.get(method)
    if tables is None:
        raise ProxyRefused(405, f"{method} is not forwarded to the PACS (GET for QIDO/WADO-RS, POST for STOW-RS)")
    for kind, patterns in tables:
        if any(p.match(decoded) for p in patterns):
            return kind, decoded
    wanted = "POST: studies or studies/{StudyInstanceUID} (STOW-RS)" if method == "POST" else \
        "GET: QIDO-RS searches and WADO-RS metadata, instances, frames, rendered, thumbnails, bulk data"
    raise ProxyRefused(400, f"{method} {path!r} is not a DICOMweb resource the proxy forwards ({wanted}; "
                            "UIDs are digits and dots)")


def forwarded_query(raw: bytes | str) -> str:
    """The query for the PACS: decoded, ``includefield`` lists split into repeated parameters, re-encoded
    with literal commas and wildcards (what Orthanc's DICOMweb plugin honours)."""
    raw = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if len(raw) > MAX_QUERY:
        raise ProxyRefused(414, f"the query string has {len(raw)} characters; at most {MAX_QUERY}")
    pairs = []
    for key, value in parse_qsl(raw, keep_blank_values=True):
        if "\x00" in key or "\x00" in value:
            raise ProxyRefused(400, "the query string contains a NUL character")
        values = [v.strip() for v in value.split(",") if v.strip()] if key.lower() == "includefield" else [value]
        pairs += [(key, v) for v in values]
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=',*')}" for k, v in pairs)


def _prefix(kind: str) -> str:
    from monailabel.config import settings

    prefix = {"qido": settings.MONAI_LABEL_QIDO_PREFIX, "wado": settings.MONAI_LABEL_WADO_PREFIX,
              "stow": settings.MONAI_LABEL_STOW_PREFIX}[kind]
    return f"{prefix.strip('/')}/" if prefix else ""


def _pacs_auth(headers: dict[str, str]):
    """(requests auth, headers) for the PACS: MONAI Label's DICOMweb credentials, or Google's token."""
    from monailabel.config import settings

    if "googleapis.com" in settings.MONAI_LABEL_STUDIES:  # as upstream: Google Healthcare API
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        return None, {**headers, "Authorization": f"Bearer {credentials.token}"}
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return ((user, password) if user and password else None), headers


_session = requests.Session()


def _forward(method: str, url: str, headers: dict[str, str], body: bytes | None):
    auth, headers = _pacs_auth(headers)
    return _session.request(method, url, headers=headers, data=body, auth=auth, timeout=timeouts(),
                            allow_redirects=False)


async def proxy_dicom(request, op: str, path: str):
    """Drop-in for ``monailabel.endpoints.proxy.proxy_dicom`` (the routes look it up at call time)."""
    from monailabel.config import settings

    studies = (settings.MONAI_LABEL_STUDIES or "").rstrip("/")
    if not studies.startswith(("http://", "https://")):
        return JSONResponse({"detail": "there is no PACS to proxy: the server's --studies is a local folder"},
                            status_code=404)
    try:
        kind, resource = dicomweb_resource(request.method, path)
        query = forwarded_query(request.scope.get("query_string", b""))
    except ProxyRefused as e:
        logger.warning(f"DICOMweb proxy refused {request.method} {path!r}: {e}")
        return JSONResponse({"detail": str(e)}, status_code=e.status)
    url = f"{studies}/{_prefix(kind)}{resource}" + (f"?{query}" if query else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST}
    body = await request.body() if kind == "stow" else None
    health = health_for(studies)
    try:
        health.check()
        answer = await asyncio.to_thread(_forward, request.method, url, headers, body)
    except Exception as e:
        error = pacs_error(health, e)
        if error is None:
            raise
        return JSONResponse({"detail": error.detail}, status_code=503, headers=error.headers)
    if answer.status_code in UNAVAILABLE:  # never the PACS's own challenge: the browser must not ask for it
        error = health.failed(problem(health.url, status=answer.status_code))
        return JSONResponse({"detail": error.detail}, status_code=503, headers=error.headers)
    health.ok()
    kept = {k: v for k, v in answer.headers.items() if k.lower() in RETURNED}
    return Response(content=answer.content, status_code=answer.status_code, headers=kept)


def install() -> None:
    """Route MONAI Label's proxy endpoints to :func:`proxy_dicom` (idempotent)."""
    from monailabel.endpoints import proxy

    if getattr(proxy.proxy_dicom, "upstream", None) is None:
        proxy_dicom.upstream = proxy.proxy_dicom  # kept for the test that shows upstream's behaviour
        proxy.proxy_dicom = proxy_dicom
