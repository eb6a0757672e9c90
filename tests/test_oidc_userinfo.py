"""Opaque access tokens checked at a real OIDC provider's userinfo endpoint (lib/monailabel_adapter/userinfo.py).

The provider is a real process on 127.0.0.1 (``mrannotator.testing.oidc_provider``: PyPI oidc-provider-mock);
tokens come from its authorization-code + PKCE flow, as a browser gets them. Also: the served OHIF config
carries the ``oidc`` entry only with auth on, and the viewer's files are public.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
import requests

pytestmark = pytest.mark.server

USER = {"sub": "rita", "preferred_username": "rita", "roles": ["monailabel-reviewer"]}


def _token(idp: str, client_id: str = "mrannotator-ohif") -> str:
    """An access token as OHIF gets it: authorization code + PKCE, the form posted with the user's subject."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    callback = "http://127.0.0.1:1/viewer/callback"
    r = requests.post(f"{idp}/oauth2/authorize", data={"sub": USER["sub"]}, allow_redirects=False, timeout=30,
                      params={"client_id": client_id, "redirect_uri": callback, "response_type": "code",
                              "scope": "openid profile", "code_challenge": challenge, "code_challenge_method": "S256"})
    code = parse_qs(urlparse(r.headers["Location"]).query)["code"][0]
    r = requests.post(f"{idp}/oauth2/token", timeout=30, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": callback, "client_id": client_id,
        "code_verifier": verifier})
    r.raise_for_status()
    return r.json()["access_token"]


def test_opaque_tokens_are_checked_at_userinfo_cached_and_a_provider_outage_is_503(tmp_path, monkeypatch):
    from lib.monailabel_adapter import userinfo
    from lib.monailabel_adapter.realm_keys import RealmUnavailable

    from mrannotator.testing.oidc_provider import running_provider

    with running_provider(tmp_path / "provider.log", [USER], "http://127.0.0.1:1") as idp:
        token = _token(idp.url)
        assert userinfo.is_opaque(token) and not userinfo.is_opaque("a.b.c")
        check = userinfo.Userinfo(idp.url, timeout_s=2.0)
        claims = check.claims(token)
        assert claims["sub"] == "rita" and claims["roles"] == ["monailabel-reviewer"]
        with pytest.raises(jwt.InvalidTokenError, match="does not accept"):
            check.claims("x" + token[1:])
        requests.post(f"{idp.url}/users/rita/revoke-tokens", timeout=10).raise_for_status()
        assert check.claims(token) == claims  # cached: revocation is seen after CACHE_S at most
        with pytest.raises(jwt.InvalidTokenError):  # a fresh check (no cache) sees the revocation
            userinfo.Userinfo(idp.url, timeout_s=2.0).claims(token)
        fresh = _token(idp.url)
    # the provider is gone: a new token cannot be checked (503), and for RETRY_S no further wait
    started = time.monotonic()
    with pytest.raises(RealmUnavailable, match="cannot check the token"):
        check.claims(fresh)
    with pytest.raises(RealmUnavailable):
        check.claims(fresh + "x")
    assert time.monotonic() - started < 3.0


def test_served_ohif_config_has_the_oidc_login_only_with_auth_on(monkeypatch):
    from lib.monailabel_adapter import ohif_viewer, roles
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", False)
    assert '"oidc"' not in ohif_viewer.app_config()
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", "https://idp.example.org/realms/h")
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_CLIENT_ID", "ohif-client")
    monkeypatch.setenv("MRANNOTATOR_OHIF_OIDC_SCOPE", "openid roles")
    config = ohif_viewer.app_config()
    for part in ('"authority": "https://idp.example.org/realms/h"', '"client_id": "ohif-client"',
                 '"response_type": "code"', '"redirect_uri": "/callback"', '"scope": "openid roles"'):
        assert part in config, part
    assert roles.required_role("GET", "/viewer/index.html") == roles.PUBLIC == roles.required_role("GET", "/viewer")
    assert roles.required_role("GET", "/proxy/dicom/qido/studies") == "user"
