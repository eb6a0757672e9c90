"""Token check: MONAI Label 0.8.5 calls ``jwt.decode`` without ``algorithms`` (fix 1); keys from
:mod:`.realm_keys` (JWKS by ``kid``, cached, fetched off the event loop)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import jwt
import requests
from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.config import settings

from . import userinfo
from .realm_keys import LEGACY, KeyPolicy, RealmKeys, RealmUnavailable
from .roles import ROLE_ORDER, role_names

logger = logging.getLogger(__name__)


_stores: dict[str, RealmKeys] = {}
_stores_lock = threading.Lock()
_refreshing: dict[str, asyncio.Future] = {}


def realm_keys(realm_uri: str) -> RealmKeys:
    """The key cache of a realm (one per realm URL, created on first use)."""
    with _stores_lock:
        store = _stores.get(realm_uri)
        if store is None:
            store = _stores[realm_uri] = RealmKeys(realm_uri, KeyPolicy.from_env(settings.MONAI_LABEL_AUTH_TIMEOUT))
        return store


def _checked_claims(token: str, store: RealmKeys, fetched: bool | None) -> dict[str, Any] | None:
    """Claims of a valid access token, or None when the realm's keys must be fetched first (never fetches).
    ``fetched``: None before a refresh, else whether the refresh read the realm (False: it was read less
    than ``min_refresh_s`` ago). ``jwt.InvalidTokenError``: 401; RealmUnavailable: the key the token needs
    cannot be read now (503)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as e:
        raise jwt.InvalidTokenError(f"not a JWT: {e}") from e
    if kid is not None and not isinstance(kid, str):
        raise jwt.InvalidTokenError("the token's kid is not a string")
    key = store.key(kid)
    if key is None:
        if fetched is None:
            return None
        if store.is_broken(kid):
            raise RealmUnavailable(f"the realm serves the key {kid!r} in a form that cannot be read")
        if not fetched and kid is not None:  # a key newer than our last read: the client may retry
            raise RealmUnavailable(f"the key {kid!r} is not among the realm's keys read a moment ago")
        raise jwt.InvalidTokenError(f"the token is signed with a key the realm does not list (kid {kid!r})")
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm],
            audience=settings.MONAI_LABEL_AUTH_CLIENT_ID,
            issuer=store.realm_uri,
            options={"require": ["exp", "iss", "aud"]},
            leeway=10,  # clock skew between the identity provider and this server
        )
    except jwt.InvalidSignatureError:
        if kid is None and fetched is None and store.key(LEGACY) is key:  # the realm URL's key may be new
            return None
        if store.is_broken(kid):
            raise RealmUnavailable("the realm's new key cannot be read") from None
        raise
    if claims.get("typ") != "Bearer":  # Keycloak: "ID" and "Refresh" tokens are not access tokens
        raise jwt.InvalidTokenError(f"an access token (typ Bearer) is required, not typ {claims.get('typ')!r}")
    return claims


def verify_token(token: str) -> dict[str, Any]:
    """Claims of a valid access token; ``jwt.InvalidTokenError`` for a bad signature, audience, issuer,
    algorithm, type or an expired token; RealmUnavailable when its key cannot be read now (may block for
    one bounded key fetch: use :func:`verify_token_async` on the event loop). An opaque token goes to the
    realm's userinfo endpoint when MRANNOTATOR_AUTH_USERINFO is on (:mod:`.userinfo`)."""
    if userinfo.enabled() and userinfo.is_opaque(token):
        return _userinfo().claims(token)
    store = realm_keys(settings.MONAI_LABEL_AUTH_REALM_URI)
    claims = _checked_claims(token, store, None)
    if claims is None:
        claims = _checked_claims(token, store, store.refresh())
    return claims


async def verify_token_async(token: str) -> dict[str, Any]:
    """:func:`verify_token` for the event loop: cached keys are used at once; a needed fetch runs in a
    worker thread, shared by every request that needs it, and waits at most the fetch timeout."""
    if userinfo.enabled() and userinfo.is_opaque(token):
        return await userinfo.claims_async(_userinfo(), token)
    store = realm_keys(settings.MONAI_LABEL_AUTH_REALM_URI)
    claims = _checked_claims(token, store, None)
    if claims is None:
        claims = _checked_claims(token, store, await _refresh(store))
    elif store.stale() and store.unavailable() is None:
        _refresh_task(store).add_done_callback(lambda f: f.cancelled() or f.exception())  # in the background
    return claims


def _userinfo() -> userinfo.Userinfo:
    return userinfo.for_realm(settings.MONAI_LABEL_AUTH_REALM_URI, float(settings.MONAI_LABEL_AUTH_TIMEOUT))


def _refresh_task(store: RealmKeys) -> asyncio.Future:
    task = _refreshing.get(store.realm_uri)
    if task is None or task.done():
        task = _refreshing[store.realm_uri] = asyncio.ensure_future(asyncio.to_thread(store.refresh))
    return task


async def _refresh(store: RealmKeys) -> bool:
    failure = store.unavailable()  # negative cache: no wait at all
    if failure is not None:
        raise failure
    try:
        return await asyncio.wait_for(asyncio.shield(_refresh_task(store)), store.policy.timeout_s + 0.5)
    except TimeoutError:
        store.note_failure(f"the realm {store.realm_uri} did not answer within {store.policy.timeout_s:g} s")
        raise RealmUnavailable(store.last_error) from None


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

