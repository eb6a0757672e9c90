"""Token check: MONAI Label 0.8.5 calls ``jwt.decode`` without ``algorithms`` (fix 1)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt
import requests
from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.config import settings

from .roles import ROLE_ORDER, role_names

logger = logging.getLogger(__name__)


class RealmUnavailable(RuntimeError):
    """The realm's public key could not be fetched (the identity provider is down or misconfigured)."""


_KEY_TTL_S = 300.0
_key_cache: dict[str, tuple[float, str]] = {}
_key_lock = threading.Lock()


def realm_public_key(realm_uri: str, max_age_s: float = _KEY_TTL_S) -> str:
    """PEM public key served at the realm URL (``{"public_key": ...}``, as Keycloak does), cached 5 min."""
    with _key_lock:
        hit = _key_cache.get(realm_uri)
        if hit and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
    try:
        r = requests.get(realm_uri, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        r.raise_for_status()
        key = r.json()["public_key"]
    except (requests.RequestException, ValueError, KeyError) as e:
        raise RealmUnavailable(f"cannot read the realm's public key from {realm_uri}: {type(e).__name__}") from e
    pem = f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
    with _key_lock:
        _key_cache[realm_uri] = (time.monotonic(), pem)
    return pem


def verify_token(token: str) -> dict[str, Any]:
    """Claims of a valid access token; ``jwt.InvalidTokenError`` for a bad signature, audience, issuer,
    algorithm or an expired token."""
    realm = settings.MONAI_LABEL_AUTH_REALM_URI

    def decode(key: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            audience=settings.MONAI_LABEL_AUTH_CLIENT_ID,
            issuer=realm,
            options={"require": ["exp", "iss", "aud"]},
            leeway=10,  # clock skew between the identity provider and this server
        )

    try:
        return decode(realm_public_key(realm))
    except jwt.InvalidSignatureError:  # the realm may have rotated its key: read it again (at most every 30 s)
        return decode(realm_public_key(realm, max_age_s=30.0))


def token_roles(claims: dict[str, Any]) -> list[str]:
    """Role names at MONAI_LABEL_AUTH_TOKEN_ROLES (``realm_access#roles``: a ``#``-separated claim path)."""
    value: Any = claims
    for key in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return [r for r in value if isinstance(r, str)] if isinstance(value, list) else []


def role_level(roles: list[str]) -> int:
    """Index in ROLE_ORDER of the highest role held; -1 for none."""
    names = role_names()
    return max((i for i, level in enumerate(ROLE_ORDER) if names[level] in roles), default=-1)


def implied_role_names(roles: list[str]) -> list[str]:
    """The token's role and every lower one (an admin is also a reviewer, annotator and user)."""
    names = role_names()
    return [names[level] for level in ROLE_ORDER[: role_level(roles) + 1]]


def from_token(token: str):
    """Drop-in for ``monailabel.endpoints.user.auth.from_token`` with the token really checked."""
    from monailabel.endpoints.user.auth import DEFAULT_USER, User

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    try:
        claims = verify_token(token)
    except RealmUnavailable as e:
        raise jwt.InvalidTokenError(str(e)) from e
    return User(
        username=str(claims.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or claims.get("sub") or ""),
        email=claims.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=claims.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=implied_role_names(token_roles(claims)),
    )


def _rbac_checked_by_middleware():
    """RBAC.__call__ with the same signature (FastAPI reads it for the schema and for each request),
    which only authenticates: roles are ROUTE_ROLES, checked by ServerGuard."""
    from fastapi import Security
    from monailabel.endpoints.user.auth import User, get_current_user

    async def __call__(self, user: User = Security(get_current_user)) -> User:  # noqa: B008 (FastAPI idiom)
        return user

    return __call__


async def _identity_provider_refused(request: Request, exc: requests.HTTPError) -> JSONResponse:
    """MONAI Label's /auth/token forwards a refused login (wrong password) as a bare 500."""
    status = exc.response.status_code if exc.response is not None else 502
    if 400 <= status < 500:
        return JSONResponse({"detail": "the identity provider refused the login"}, status_code=401)
    return JSONResponse({"detail": f"the identity provider answered {status}"}, status_code=502)

