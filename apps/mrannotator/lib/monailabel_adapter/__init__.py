"""The one place where MONAI Label 0.8.5's server is fixed for this app (site-packages is never edited).

:func:`install` runs once in the server process, from ``main.py`` when MONAI Label's lifespan creates
the app (before uvicorn binds its socket). Each fix has a test in ``tests/test_server_auth.py`` or
``tests/test_bad_input.py`` that fails if the upstream behaviour it works around changes.

1. **Token check** (``monailabel/endpoints/user/auth.py`` calls ``jwt.decode`` without ``algorithms``,
   which PyJWT 2.x requires, so every token is refused): :func:`verify_token` checks the signature with
   the realm's key named by the token's ``kid`` (the realm's JWK set, or the realm URL's ``public_key``;
   cached, fetched off the event loop with a bounded wait: ``realm_keys.py``), the audience
   (``MONAI_LABEL_AUTH_CLIENT_ID``), the issuer (``MONAI_LABEL_AUTH_REALM_URI``), the expiry and
   ``typ: Bearer``. It replaces ``from_token``, so MONAI Label's own ``/auth/token/valid`` works too.
2. **Roles per route**: MONAI Label's per-endpoint RBAC is flat (a token must hold the exact role) and
   disagrees with an annotation team's needs (training needs admin, the dataset ZIP only annotator,
   model upload only annotator). :data:`ROUTE_ROLES` is the table used instead, with ordered roles
   (user < annotator < reviewer < admin); a route it does not list needs admin. Why a middleware rather
   than extra route dependencies: it sees every request, including routes outside the OpenAPI schema
   (``/reload``, ``/ohif``, ``/proxy``, ``/static``, ``/docs``), refuses before a handler or an upload
   body is touched, and does not depend on how FastAPI stores routes (0.165 wraps included routers).
   It sits inside the CORS middleware (allow-listed sites only) so that they also see 401/403 answers.
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
   or 500). Also (``checks.py``): NUL or over-long names, unknown batch-infer model, ``output=dicom_seg``
   on a local datastore, unknown or foreign ``session_id``, a model upload
   for a model with no model file: 4xx.
7. **HTTP limits** (uvicorn's h11 protocol never closes a silent or slow socket and resets oversized
   requests): idle, header and body timeouts, a connection cap, 414/431 answers, HEAD and OPTIONS
   (``http_limits.py``).
8. **Cross-site requests** (:mod:`.origin`): CORS only for ``MRANNOTATOR_CORS_ORIGINS`` (MONAI Label
   allows any origin with credentials); cross-site state changes 403 with or without auth.
9. **DICOMweb proxy** (:mod:`.dicomweb_proxy`, applied with the OHIF fixes): only OHIF's DICOMweb
   resources, normalised; STOW for annotators; the PACS's challenge never forwarded; PACS down -> 503.
10. **Archives** (``archives.py``): ``PUT /session/?uncompress=true`` used ``shutil.unpack_archive`` (no member
   filter: ``../`` and absolute members written anywhere, no size cap); now only regular files and folders
   inside the target, caps on members, bytes and ratio checked while unpacking, nothing left on refusal.
11. **Upload size** (``upload_limits.py``): every form route's body is capped (413).
12. **Sessions** (``sessions.py``): an owner (the token's subject), expiry enforced on lookup, no server
   paths in answers, safe upload names, built in a staging folder and renamed into place.
13. **Parameters** (``params.py``): ``params`` / ``info`` form fields must be JSON objects of bounded depth
   with typed keys; training numbers must be positive before anything is queued.
14. **No server paths** (``answers.py``): the next sample's ``path`` is its download route.
Tests: ``tests/test_hostile_input.py`` (10-14 and the checks of 6 added with them).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import requests
from fastapi import FastAPI
from monailabel.config import settings

from . import answers, datastore_internals, http_limits, origin, params, sessions, uploads
from .auth import _identity_provider_refused, _rbac_checked_by_middleware, from_token, verify_token  # noqa: F401
from .bind import BindPolicy, _uvicorn_configs, apply_bind_policy, start_server_host  # noqa: F401
from .checks import _invalid_json, precheck  # noqa: F401
from .middleware import ServerGuard
from .roles import PUBLIC, ROUTE_ROLES, match_route, required_role, role_names  # noqa: F401
from .uploads import is_request_upload  # noqa: F401

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ install
_installed: BindPolicy | None = None


def server_app() -> FastAPI | None:
    """MONAI Label's FastAPI object when this process is the server (not a train/scoring subprocess)."""
    module = sys.modules.get("monailabel.app")
    return getattr(module, "app", None) if module is not None else None


def install(upload_root: Path) -> BindPolicy | None:
    """Apply every fix above to the running server (idempotent); None outside the server process."""
    global _installed
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

    uploads.install(upload_root)
    http_limits.install(_uvicorn_configs())  # timeouts, connection cap, 414/431 (before uvicorn binds)
    sessions.install()
    params.install()
    answers.install()
    datastore_internals.install()  # upload file names are names, not paths

    _declare_roles_in_openapi(fastapi_app)
    fastapi_app.add_exception_handler(json.JSONDecodeError, _invalid_json)
    fastapi_app.add_exception_handler(requests.HTTPError, _identity_provider_refused)
    # The stack was built for the lifespan call already; add ours (OriginGuard outermost, CORS only for
    # MRANNOTATOR_CORS_ORIGINS, then ServerGuard) and rebuild it.
    origin.install(fastapi_app, check_host=not policy.remote and not auth)
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
    return uploads.default_root(port)
