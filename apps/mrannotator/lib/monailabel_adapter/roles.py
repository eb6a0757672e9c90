"""Roles per route: the lowest role each MONAI Label route needs (fix 2 of the package docstring)."""

from __future__ import annotations

import re

from monailabel.config import settings

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
    # the current OHIF (ohif_viewer.py): public, a browser loads it before it logs in (OIDC, ohif_oidc.py);
    # its files hold no data and no secret, every data request it makes needs a token
    ("GET", "/viewer"): PUBLIC,
    ("GET", "/viewer/{path:path}"): PUBLIC,
    ("GET", "/proxy/dicom/wado/{path:path}"): "user",
    ("GET", "/proxy/dicom/qido/{path:path}"): "user",
    ("GET", "/proxy/dicom/{path:path}"): "user",
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
    # the OHIF viewer's MONAI Label workflow (annotate.py): next series, proposal as frames, save the label
    ("POST", "/annotate/next/{strategy}"): "annotator",
    ("POST", "/annotate/infer"): "annotator",
    ("PUT", "/annotate/label"): "annotator",
    ("POST", "/annotate/refine"): "annotator",
    # POST to the proxy is a STOW-RS (OHIF sends it to its WADO root); nothing else is forwarded on POST
    ("GET", "/proxy/dicom/stow/{path:path}"): "annotator",
    ("POST", "/proxy/dicom/stow/{path:path}"): "annotator",
    ("POST", "/proxy/dicom/wado/{path:path}"): "annotator",
    ("POST", "/proxy/dicom/qido/{path:path}"): "annotator",
    ("POST", "/proxy/dicom/{path:path}"): "annotator",
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

