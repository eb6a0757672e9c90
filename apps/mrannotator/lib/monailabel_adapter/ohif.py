"""Fixes for the OHIF viewer MONAI Label 0.8.5 serves at /ohif/ and for its DICOMweb proxy.

Applied once, in the server process, when the app starts (:func:`apply`); each has a test in
tests/test_pacs.py that fails when upstream behaves differently, so the fix can be dropped then.

1. ``monailabel.endpoints.ohif.get_ohif`` joins nested asset paths with ``os.pathsep`` (":" on
   Linux), so ``/ohif/assets/x.png`` is answered with index.html. Here the path is joined as a path,
   kept inside the OHIF folder, and a path that is no file (an OHIF route) still gets index.html.
2. ``monailabel.endpoints.proxy.proxy_dicom`` forwards the path without the query string, so QIDO
   searches from OHIF (``?PatientName=...&limit=...``, ``includefield``) reach the PACS unfiltered;
   it also forwards any path and method: replaced by :mod:`.dicomweb_proxy`.
3. The bundled OHIF panel takes the server URL from the ``MONAILABEL_SERVER_URL`` cookie, falling
   back to port 8000: a server on any other port is never reached. The viewer pages are served
   with that cookie set to the server they came from.
4. Beside it, the current OHIF (3.13, with a segmentation mode a person can correct and save in) at
   ``/viewer/``: :mod:`.ohif_viewer`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from urllib.parse import quote

from fastapi import Request  # at module level: FastAPI resolves the route's (string) annotations here

logger = logging.getLogger(__name__)

SERVER_URL_COOKIE = "MONAILABEL_SERVER_URL"
_applied = False


def ohif_file(ohif_dir: str | Path, path: str) -> Path:
    """The file for ``/ohif/<path>``: a nested asset when it exists inside ``ohif_dir``, else index.html."""
    root = Path(ohif_dir).resolve()
    if path:
        candidate = (root / path).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    return root / "index.html"


def fixed_get_ohif(path: str):
    from fastapi import HTTPException
    from fastapi.responses import FileResponse
    from monailabel.endpoints import ohif
    from monailabel.utils.others.generic import get_mime_type

    file = ohif_file(Path(ohif.__file__).resolve().parent / "static" / "ohif", path)
    if not file.is_file():
        raise HTTPException(status_code=404, detail="Resource NOT Found")
    return FileResponse(str(file), media_type=get_mime_type(str(file)))


def server_url(request) -> str:
    """The URL this request reached the server at (what the viewer must talk back to)."""
    return str(request.base_url)


def _ohif_route_with_cookie():
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC

    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))  # the stock route's access check

    async def ohif_page(request: Request, path: str, user=user_role):
        from monailabel.endpoints import ohif

        response = ohif.get_ohif(path)
        if not path or not ohif_file(Path(ohif.__file__).resolve().parent / "static" / "ohif", path).suffix or \
                path.endswith(".html"):
            # OHIF's CookieUtils unescape()s the value; Path=/ so every viewer route sees it
            response.set_cookie(SERVER_URL_COOKIE, quote(server_url(request), safe=""), path="/", samesite="lax")
        return response

    return ohif_page


def apply() -> None:
    """Patch the running MONAI Label server (no-op outside it, and when already applied)."""
    global _applied
    if _applied:
        return
    from monailabel.endpoints import ohif

    from . import dicomweb_proxy, ohif_viewer

    ohif.get_ohif = fixed_get_ohif
    dicomweb_proxy.install()
    server = sys.modules.get("monailabel.app")
    if server is not None:  # the FastAPI app: serve /ohif/ pages with the cookie, ahead of the stock route
        from fastapi.routing import APIRoute
        from monailabel.config import settings

        route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/ohif/{{path:path}}", _ohif_route_with_cookie(),
                         methods=["GET"], include_in_schema=False)
        server.app.router.routes.insert(0, route)
        ohif_viewer.install(server.app)  # the current OHIF, with the segmentation mode, at /viewer/
    _applied = True
    logger.info("applied OHIF fixes: nested asset paths, DICOMweb proxy, server URL cookie")
