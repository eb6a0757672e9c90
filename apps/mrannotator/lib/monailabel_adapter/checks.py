"""Request checks: status codes MONAI Label gets wrong, answered before a handler runs (fix 6)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from .internals import tasks


def _query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


def precheck(method: str, template: str, path: str, query: dict[str, str]) -> tuple[int, str] | None:
    """(status, message) for a request MONAI Label would queue, store or answer wrongly; None if fine."""
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if (method, template) == ("POST", "/train/{model}") and last not in tasks(app, "trainers"):
        return 404, f"trainer {last!r} does not exist; choose from {', '.join(tasks(app, 'trainers'))}"
    if (method, template) == ("POST", "/scoring/{method}") and last not in tasks(app, "scoring_methods"):
        return 404, f"scoring method {last!r} does not exist; choose from {', '.join(tasks(app, 'scoring_methods'))}"
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

