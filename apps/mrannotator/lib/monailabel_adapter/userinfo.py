"""Opaque access tokens (not JWTs), checked at the realm's OpenID Connect ``userinfo_endpoint``.

Keycloak's access tokens are JWTs (checked offline with the realm's keys, :mod:`.realm_keys`). Many OpenID
providers hand a browser application an opaque access token instead (e.g. ``oidc-provider-mock``, which the
browser test logs in against): the only standard check a resource server can make of it is to present it to
the provider's ``userinfo_endpoint`` (OpenID Connect Core 5.3), which answers the user's claims for a valid,
unexpired token. With ``MRANNOTATOR_AUTH_USERINFO=true`` a bearer token that is not a JWT is checked there;
the claims answered (roles at ``MONAI_LABEL_AUTH_TOKEN_ROLES``) are used as a JWT's would be.

- The endpoint comes from ``{MONAI_LABEL_AUTH_REALM_URI}/.well-known/openid-configuration``.
- A token the provider accepted is cached ``CACHE_S`` (by its SHA-256, at most ``MAX_CACHED`` tokens): a
  revoked token keeps working that long at most.
- The provider refusing the token (400/401/403) is a 401; the provider down or erring is a 503 (each call
  waits at most the key fetch timeout, and for ``RETRY_S`` after a failure 503 comes at once).
- Userinfo says nothing of the audience: any token the provider issued to any of its clients is accepted.
  Off by default; use it with a provider that serves only this server's clients, or use JWT access tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from typing import Any

import jwt
import requests

from .realm_keys import FETCH_TIMEOUT_S, RealmUnavailable

SETTING = "MRANNOTATOR_AUTH_USERINFO"
CACHE_S = 30.0
RETRY_S = 5.0
MAX_CACHED = 4096


def enabled() -> bool:
    return os.environ.get(SETTING, "").strip().lower() in ("1", "true", "yes", "on")


def is_opaque(token: str) -> bool:
    """Not a JWS compact serialisation (three dot-separated parts)."""
    return token.count(".") != 2


class Userinfo:
    """The userinfo check of one realm (thread-safe)."""

    def __init__(self, realm_uri: str, timeout_s: float = FETCH_TIMEOUT_S):
        self.realm_uri = realm_uri.rstrip("/")
        self.timeout_s = min(timeout_s, FETCH_TIMEOUT_S)
        self._endpoint: str | None = None
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._failed_at: float | None = None
        self._last_error = ""
        self._lock = threading.Lock()

    def cached(self, token: str) -> dict[str, Any] | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            self._cache.pop(key, None)
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_S:
                raise RealmUnavailable(self._last_error)
        return None

    def claims(self, token: str) -> dict[str, Any]:
        """The user's claims for a token the provider accepts (may block up to ``timeout_s``)."""
        found = self.cached(token)
        if found is not None:
            return found
        deadline = time.monotonic() + self.timeout_s
        try:
            answer = self._ask(token, deadline)
        except (requests.RequestException, ValueError) as e:
            message = f"cannot check the token at the realm {self.realm_uri}: {type(e).__name__}: {str(e)[:200]}"
            with self._lock:
                self._failed_at, self._last_error = time.monotonic(), message
            raise RealmUnavailable(message) from e
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[hashlib.sha256(token.encode()).hexdigest()] = (time.monotonic() + CACHE_S, answer)
        return answer

    def _ask(self, token: str, deadline: float) -> dict[str, Any]:
        if self._endpoint is None:
            conf = requests.get(f"{self.realm_uri}/.well-known/openid-configuration",
                                timeout=max(0.1, deadline - time.monotonic()))
            conf.raise_for_status()
            endpoint = conf.json().get("userinfo_endpoint")
            if not isinstance(endpoint, str):
                raise ValueError("the realm's OpenID configuration has no userinfo_endpoint")
            self._endpoint = endpoint
        r = requests.get(self._endpoint, headers={"Authorization": f"Bearer {token}"},
                         timeout=max(0.1, deadline - time.monotonic()))
        if r.status_code in (400, 401, 403):
            raise jwt.InvalidTokenError(f"the identity provider does not accept the token (userinfo {r.status_code})")
        r.raise_for_status()
        answer = r.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("sub"), str):
            raise jwt.InvalidTokenError("the identity provider's userinfo answer has no subject")
        return answer


_checks: dict[str, Userinfo] = {}
_checks_lock = threading.Lock()


def for_realm(realm_uri: str, timeout_s: float) -> Userinfo:
    with _checks_lock:
        check = _checks.get(realm_uri)
        if check is None:
            check = _checks[realm_uri] = Userinfo(realm_uri, timeout_s)
        return check


async def claims_async(check: Userinfo, token: str) -> dict[str, Any]:
    """:meth:`Userinfo.claims` for the event loop: a cached answer at once, else the call in a worker thread."""
    found = check.cached(token)
    return found if found is not None else await asyncio.to_thread(check.claims, token)
