"""Request checks: status codes MONAI Label gets wrong, answered before a handler runs (fix 6).

Also refused here, each with a 4xx and a message (MONAI Label 0.8.5 answers these 500, or 200 and then fails):
a NUL character or a path part over 255 bytes in the path or the query (``?image=a%00b``: ValueError, 500;
``/ohif/<10,000 characters>``: OSError, 500); ``POST /batch/infer/<unknown model>`` (200 SUBMITTED, then
ERROR): 404; ``output=dicom_seg`` on a local datastore (500 after the whole inference): 400 before it;
``PUT /model/<model>`` for a model with no model file (500 "Model File Name NOT
configured" after the upload): 404 before it; ``session_id`` of a session that does not exist, expired or
belongs to another user: 404 (MONAI Label runs on an empty image name).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from .internals import tasks

# a task name that is not served: what it is called and how the served ones are introduced
_UNKNOWN = {"infers": ("model", "is not served here; served models:"),
            "trainers": ("trainer", "does not exist; choose from"),
            "strategies": ("strategy", "does not exist; choose from"),
            "scoring_methods": ("scoring method", "does not exist; choose from")}


def unknown_task(app, kind: str, name) -> str | None:
    """The 404 message for ``name`` when it is no task of ``kind`` (``infers``, ``trainers``, ``strategies``,
    ``scoring_methods``) of ``app``, else None: one wording for the route checks here and for the app's own
    methods (``main.py``), which MONAI Label also calls without HTTP (batch infer)."""
    served = tasks(app, kind)
    if name in served:
        return None
    noun, rest = _UNKNOWN[kind]
    return f"{noun} {name!r} {rest} {', '.join(served)}"


def _query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


def malformed(path: str, query: dict[str, str]) -> tuple[int, str] | None:
    """400 for a NUL character, or a path part too long for any file name, in the path or the query."""
    for where, text in (("path", path), *((f"parameter {k!r}", v) for k, v in query.items())):
        if "\0" in text:
            return 400, f"the request {where} contains a NUL character"
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in path.split("/")):
        return 400, "a part of the request path is longer than 255 bytes (no such file or id)"
    return None


def _more_checks(app, method: str, template: str, last: str, query: dict[str, str]) -> tuple[int, str] | None:
    if (method, template) == ("POST", "/batch/infer/{model}") and unknown_task(app, "infers", last):
        return 404, unknown_task(app, "infers", last)
    if (method, template) == ("POST", "/infer/{model}") and query.get("output") == "dicom_seg" \
            and not str(app.studies).startswith(("http://", "https://")):
        return 400, "output=dicom_seg needs a DICOMweb (PACS) datastore; this server stores files: " \
                    "use output=image (NIfTI) or output=all"
    if (method, template) == ("PUT", "/model/{model}") and not app.model_file(last, validate=False):
        return 404, f"model {last!r} has no model file to replace: this app serves nnU-Net model folders " \
                    "(installed with `mrannotator weights`, or published by POST /train/)"
    session_id = query.get("session_id")
    if (method, template) == ("POST", "/infer/{model}") and session_id and not query.get("image"):
        sessions = app.sessions()
        if sessions is None or sessions.get_session(session_id, update_ts=False) is None:
            return 404, f"session {session_id!r} does not exist, has expired or belongs to another user"
    return None


def precheck(method: str, template: str, path: str, query: dict[str, str]) -> tuple[int, str] | None:
    """(status, message) for a request MONAI Label would queue, store or answer wrongly; None if fine."""
    from monailabel.interfaces.utils.app import app_instance

    refusal = malformed(path, query)
    if refusal is not None:
        return refusal
    app = app_instance()
    last = path.rstrip("/").rsplit("/", 1)[-1]
    refusal = _more_checks(app, method, template, last, query)
    if refusal is not None:
        return refusal
    if (method, template) == ("POST", "/train/{model}") and unknown_task(app, "trainers", last):
        return 404, unknown_task(app, "trainers", last)
    if (method, template) == ("POST", "/scoring/{method}") and unknown_task(app, "scoring_methods", last):
        return 404, unknown_task(app, "scoring_methods", last)
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


async def _invalid_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"a form field (params/info) is not valid JSON: {exc.msg} at position {exc.pos}"},
                        status_code=400)

