"""The current OHIF viewer (``@ohif/app`` 3.13.2, installed by scripts/install_ohif.py) at ``/viewer/``.

The OHIF MONAI Label 0.8.5 bundles (at ``/ohif/``) has a MONAI Label mode with only the MONAI Label panel:
no segmentation panel, brush, eraser or export. OHIF 3.13's prebuilt ``dist`` has its segmentation mode
compiled in (Segmentation panel: add / delete / rename segments, brush, eraser, threshold tools, and
"Export DICOM SEG" that stores the SEG to the data source). It is served as shipped, beside the bundled
one, with this server's own ``app-config.js``: one DICOMweb data source, the server's ``/proxy/dicom``
(same origin: no CORS, the PACS credentials stay in the server), study list on, no other data source.

The viewer's files are public (``roles.py``: a browser loads them before it has a token); every request for
data goes through the proxy and MONAI Label routes, which check the token as before. With auth on, OHIF logs
in from the browser (``oidc`` in app-config.js, authorization code + PKCE: ``ohif_oidc.py``).
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fastapi import Request

from .ohif_oidc import oidc_clients

MOUNT = "/viewer"
VIEWER_DIR = Path(__file__).resolve().parents[2] / "ohif_viewer"
EXTENSION_DIR = Path(__file__).resolve().parents[2] / "ohif_extension"  # the MONAI Label workflow (annotate.py)
# app-config.js hands its config to the extension, which adds its extension and mode (no OHIF rebuild)
WITH_EXTENSION = ("window.config = ((config) => async (context) => (await import(window.PUBLIC_URL + "
                  "'mrannotator/mrannotator.js')).configure(config, context))(window.config);\n")
TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
         ".html": "text/html", ".json": "application/json", ".svg": "image/svg+xml", ".woff2": "font/woff2"}


def pacs_name() -> str:
    """The data source's name in OHIF. OHIF's "Data Source Connection Error" dialog shows only this name (not
    the server's 503 message), so it names the PACS the server uses, without any user:password in its URL.
    With auth on, app-config.js is public (a browser loads it before logging in): the PACS's address is then
    left out, as it is no one's business before a login."""
    from monailabel.config import settings

    studies = urlsplit(settings.MONAI_LABEL_STUDIES or "")
    if studies.scheme not in ("http", "https"):
        return "MRAnnotator PACS (through the server)"
    if settings.MONAI_LABEL_AUTH_ENABLE:
        return "the PACS behind the MRAnnotator server (its /info/ says why it is unavailable)"
    where = urlunsplit((studies.scheme, studies.hostname + (f":{studies.port}" if studies.port else ""),
                        studies.path.rstrip("/"), "", ""))
    return f"the PACS at {where} (through the MRAnnotator server; its /info/ says why it is unavailable)"


def data_source(proxy: str, name: str = "MRAnnotator PACS (through the server)") -> dict:
    """OHIF's DICOMweb data source for the server's proxy (``proxy``: its absolute URL, no trailing /)."""
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "mrannotator",
        "configuration": {
            "friendlyName": name,
            "name": "mrannotator",
            "qidoRoot": f"{proxy}/qido", "wadoRoot": f"{proxy}/wado", "wadoUriRoot": f"{proxy}/wado",
            "qidoSupportsIncludeField": True,  # the proxy splits includefield so that Orthanc honours it
            "supportsReject": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False, "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
            "dicomUploadEnabled": False,
        },
    }


def app_config() -> str:
    """``window.config`` for the viewer; URLs are built in the browser from its own origin."""
    config = {
        "routerBasename": MOUNT,
        "extensions": [], "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "mrannotator",
        "dataSources": [data_source("__ORIGIN__/proxy/dicom", pacs_name())],
    }
    if (oidc := oidc_clients()) is not None:
        config["oidc"] = oidc
    text = json.dumps(config, indent=2).replace('"__ORIGIN__', 'window.location.origin + "')
    header = "/** MRAnnotator: written by the server (lib/monailabel_adapter/ohif_viewer.py). */"
    return f"{header}\nwindow.config = {text};\n" + WITH_EXTENSION


def viewer_file(path: str, root: Path = VIEWER_DIR) -> Path:
    """The file for ``/viewer/<path>``: a file inside ``root``, else index.html (an OHIF route)."""
    root = root.resolve()
    if path:
        candidate = (root / path).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    return root / "index.html"


async def viewer_page(request: Request, path: str = ""):
    from fastapi.responses import FileResponse, JSONResponse, Response

    if path == "app-config.js":
        return Response(app_config(), media_type="text/javascript", headers={"Cache-Control": "no-store"})
    extension = path.startswith("mrannotator/")
    file = viewer_file(path[len("mrannotator/"):], EXTENSION_DIR) if extension else viewer_file(path)
    if not file.is_file():
        return JSONResponse({"detail": f"the OHIF viewer is not installed in {VIEWER_DIR}: run "
                                       "scripts/install.sh (or python scripts/install_ohif.py)"}, status_code=404)
    media = TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return FileResponse(str(file), media_type=media)


def install(app) -> None:
    """Serve the viewer at ``/viewer/`` on the FastAPI ``app`` (ahead of MONAI Label's routes)."""
    from fastapi.responses import RedirectResponse
    from fastapi.routing import APIRoute
    from monailabel.config import settings

    prefix = f"{settings.MONAI_LABEL_API_STR}{MOUNT}"

    async def to_viewer():
        return RedirectResponse(f"{prefix}/")

    app.router.routes[0:0] = [
        APIRoute(f"{prefix}/{{path:path}}", viewer_page, methods=["GET"], include_in_schema=False),
        APIRoute(prefix, to_viewer, methods=["GET"], include_in_schema=False),
    ]
    mimetypes.add_type("application/wasm", ".wasm")
    from . import annotate, annotate_refine

    annotate.install(app)  # the routes of the viewer's MONAI Label workflow (ohif_extension/)
    annotate_refine.install(app)  # click correction in the viewer
