"""The ``oidc`` entry of the OHIF viewer's app-config.js (``ohif_viewer.py``) when auth is on.

OHIF 3.13 logs in with OpenID Connect when ``window.config.oidc`` is set; with ``response_type: "code"`` it
uses oidc-client-ts, always with PKCE (S256). It then sends ``Authorization: Bearer <access token>`` on every
DICOMweb request of its data source (QIDO, WADO, STOW: the server's ``/proxy/dicom``) and offers the header to
extensions through ``userAuthenticationService.getAuthorizationHeader()`` (for MONAI Label routes).

Settings: the realm is MONAI Label's (``MONAI_LABEL_AUTH_REALM_URI`` as the OIDC authority: it must be the
issuer of the tokens and serve ``/.well-known/openid-configuration``; ``MONAI_LABEL_AUTH_CLIENT_ID`` as the
public client, which must allow the redirect URI ``<server>/viewer/callback``), ``MRANNOTATOR_OHIF_OIDC_SCOPE``
(default ``openid profile email``). The viewer's own files are then public (``roles.py``): a browser loads
them before it has a token; they hold no data and no secret.
"""

from __future__ import annotations

import os

from monailabel.config import settings

SCOPE_SETTING = "MRANNOTATOR_OHIF_OIDC_SCOPE"
CALLBACK = "/callback"  # under the viewer's routerBasename: <server>/viewer/callback


def oidc_clients() -> list[dict] | None:
    """OHIF's ``oidc`` list (one client), or None when auth is off."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return None
    return [{
        "authority": settings.MONAI_LABEL_AUTH_REALM_URI,
        "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID,
        "redirect_uri": CALLBACK,
        "post_logout_redirect_uri": "/",
        "response_type": "code",
        "scope": os.environ.get(SCOPE_SETTING, "").strip() or "openid profile email",
        "revokeAccessTokenOnSignout": True,
    }]
