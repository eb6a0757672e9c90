"""Every private name of MONAI Label (and of the FastAPI / OHIF bundle it serves) this app touches, and why.

This package is the only place allowed to read or replace them (``tests/test_adapter_internals.py`` greps the
rest of the app and has a canary per entry that fails when an upgrade moves one). MONAI Label 0.8.5 is the
last release; :func:`check_version` refuses to start the app on another one with a message naming this table,
rather than letting a fix silently stop applying.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_MONAILABEL = "0.8.5"

# (where, name, why we touch it). "where" is a dotted module path, or module:Class for an attribute.
INTERNALS: list[tuple[str, str, str]] = [
    ("monailabel.interfaces.app:MONAILabelApp", "_infers", "404 for an unknown model before an infer is queued"),
    ("monailabel.interfaces.app:MONAILabelApp", "_trainers", "404 for an unknown trainer (precheck, train)"),
    ("monailabel.interfaces.app:MONAILabelApp", "_strategies", "404 for an unknown strategy (next_sample)"),
    ("monailabel.interfaces.app:MONAILabelApp", "_scoring_methods", "404 for an unknown scoring method"),
    ("monailabel.interfaces.app:MONAILabelApp", "_datastore", "the datastore next_sample answers from"),
    ("monailabel.datastore.local:LocalDatastore", "_datastore", "the index object: an id must name an entry"),
    ("monailabel.datastore.local:LocalDatastore", "_update_datastore_file",
     "the index rewrite, serialised across worker threads"),
    ("monailabel.endpoints.user.auth", "from_token", "replaced: upstream decodes JWTs without algorithms="),
    ("monailabel.endpoints.user.auth:RBAC", "__call__", "replaced: roles are checked by ServerGuard instead"),
    ("monailabel.endpoints.ohif", "get_ohif", "replaced: nested asset paths joined with os.pathsep"),
    ("monailabel.endpoints.proxy", "proxy_dicom", "wrapped: the query string is dropped upstream"),
    ("monailabel.app", "app", "the FastAPI object: middleware, exception handlers, OpenAPI roles"),
    ("fastapi.routing:APIRoute", "dependant", "dependant.call replaced to run blocking handlers in threads"),
    ("fastapi.routing:APIRouter", "_routes_version", "bumped so FastAPI 0.165 rebuilds included routers"),
    ("argparse:ArgumentParser", "_actions", "start_server's own --host default (no public accessor)"),
]


class UnsupportedMonaiLabel(RuntimeError):
    pass


def check_version() -> str:
    """The installed MONAI Label version; UnsupportedMonaiLabel unless it is the one these fixes were made for."""
    import monailabel

    version = getattr(monailabel, "__version__", "unknown")
    if version != SUPPORTED_MONAILABEL:
        raise UnsupportedMonaiLabel(
            f"MRAnnotator's server fixes are made for MONAI Label {SUPPORTED_MONAILABEL}, but {version} is "
            f"installed: install monailabel=={SUPPORTED_MONAILABEL} (pyproject.toml pins it), or re-check each "
            "entry of apps/mrannotator/lib/monailabel_adapter/internals.py INTERNALS against the new release")
    return version


def tasks(app: Any, kind: str) -> dict:
    """The app's registered tasks of one kind: ``infers``, ``trainers``, ``strategies`` or ``scoring_methods``."""
    if kind not in ("infers", "trainers", "strategies", "scoring_methods"):
        raise ValueError(kind)
    return getattr(app, f"_{kind}")


def app_datastore(app: Any):
    """The datastore object the app answers from (MONAI Label keeps it private)."""
    return app._datastore


def local_index(datastore: Any):
    """A LocalDatastore's in-memory index (``.objects``: image id -> entry)."""
    return datastore._datastore
