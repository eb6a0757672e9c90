"""The realm's signing keys, cached so that the identity provider's health never stalls the server.

Keycloak publishes its keys as a JWK set (``jwks_uri`` of ``{realm}/.well-known/openid-configuration``,
i.e. ``{realm}/protocol/openid-connect/certs``); each token names its key with ``kid``. The older realm-URL
form (``{"public_key": ...}``, one key, no ``kid``) is read when the realm serves no JWK set.

- A token whose key is cached is checked without any network call, whatever the realm does meanwhile.
- A key the cache lacks (new ``kid``, rotation) triggers one fetch, bounded by :data:`FETCH_TIMEOUT_S`
  in total; a failed fetch is remembered for ``retry_s`` (negative cache: no further waits, 503 at once).
- Keys the realm stops listing are kept ``retain_s`` more, so that tokens signed before a rotation stay
  valid until they expire; a key the realm lists but serves unreadable is "broken": tokens signed with it
  get 503 (the realm is misconfigured, not the token forged), other keys keep working.
- Single flight: one fetch at a time per realm; a fetch at most every ``min_refresh_s`` after a success
  (a ``kid`` still unknown then gets 503: the client may retry).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.5  # the most one request waits for the realm (all of its answer, so < 3 s in all)
_SIGNING_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
LEGACY = ""  # the key id used for the realm URL's single public key (tokens without ``kid``)


class RealmUnavailable(RuntimeError):
    """The realm's keys could not be fetched or read (the identity provider is down or misconfigured)."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from e
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0")
    return value


@dataclass
class RealmKey:
    key: Any  # a cryptography public key (what jwt.decode takes)
    algorithm: str
    retired_at: float | None = None  # monotonic time the realm stopped listing it


@dataclass
class KeyPolicy:
    timeout_s: float = FETCH_TIMEOUT_S
    ttl_s: float = 300.0  # refresh a known key set this often (in the background)
    retry_s: float = 30.0  # after a failed fetch, no new fetch for this long (503 at once)
    min_refresh_s: float = 1.0  # after a successful fetch, an unknown kid does not fetch again this soon (503)
    retain_s: float = 600.0  # a key the realm dropped is kept this long (Keycloak's token lifespans)

    @classmethod
    def from_env(cls, auth_timeout_s: float) -> KeyPolicy:
        """``MRANNOTATOR_AUTH_KEY_{TTL,RETRY,MIN_REFRESH,RETAIN}_S``; the fetch timeout is
        MONAI_LABEL_AUTH_TIMEOUT, at most 2.5 s."""
        return cls(timeout_s=min(float(auth_timeout_s), FETCH_TIMEOUT_S),
                   ttl_s=_env_seconds("MRANNOTATOR_AUTH_KEY_TTL_S", cls.ttl_s),
                   retry_s=_env_seconds("MRANNOTATOR_AUTH_KEY_RETRY_S", cls.retry_s),
                   min_refresh_s=_env_seconds("MRANNOTATOR_AUTH_KEY_MIN_REFRESH_S", cls.min_refresh_s),
                   retain_s=_env_seconds("MRANNOTATOR_AUTH_KEY_RETAIN_S", cls.retain_s))


@dataclass
class RealmKeys:
    """The signing keys of one realm (thread-safe)."""

    realm_uri: str
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    keys: dict[str, RealmKey] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    fetched_at: float | None = None
    failed_at: float | None = None
    last_error: str = ""

    def __post_init__(self):
        self._lock = threading.Lock()  # guards the fields above
        self._fetch_lock = threading.Lock()  # single flight
        self._jwks_uri: str | None = None

    # ------------------------------------------------------------------ reading the cache (never waits)
    def key(self, kid: str | None) -> RealmKey | None:
        """The cached key for ``kid`` (None: the realm URL's key, or the only key of the set)."""
        now = time.monotonic()
        with self._lock:
            self._forget_retired(now)
            if kid is not None:
                return self.keys.get(kid)
            if LEGACY in self.keys:
                return self.keys[LEGACY]
            current = [k for k in self.keys.values() if k.retired_at is None]
            return current[0] if len(current) == 1 else None

    def is_broken(self, kid: str | None) -> bool:
        with self._lock:
            return (kid if kid is not None else LEGACY) in self.broken

    def unavailable(self) -> RealmUnavailable | None:
        """The remembered failure while the negative cache holds, else None."""
        with self._lock:
            if self.failed_at is not None and time.monotonic() - self.failed_at < self.policy.retry_s:
                return RealmUnavailable(self.last_error)
        return None

    def stale(self) -> bool:
        with self._lock:
            return self.fetched_at is None or time.monotonic() - self.fetched_at >= self.policy.ttl_s

    def note_failure(self, message: str) -> None:
        with self._lock:
            self.failed_at, self.last_error = time.monotonic(), message
        logger.error(message)

    # ------------------------------------------------------------------ refreshing (blocks <= timeout_s)
    def refresh(self) -> bool:
        """Fetch the key set unless it was read less than ``min_refresh_s`` ago (then False); True when
        read; RealmUnavailable when the realm cannot be read now (or could not be, less than ``retry_s`` ago)."""
        with self._fetch_lock:
            failure = self.unavailable()
            if failure is not None:
                raise failure
            with self._lock:
                if self.fetched_at is not None and time.monotonic() - self.fetched_at < self.policy.min_refresh_s:
                    return False
            try:
                fresh, broken = self._fetch()
            except RealmUnavailable as e:
                self.note_failure(str(e))
                raise
            self._merge(fresh, broken)
            return True

    def _merge(self, fresh: dict[str, RealmKey], broken: set[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for kid, old in self.keys.items():
                if kid not in fresh and kid not in broken and old.retired_at is None:
                    old.retired_at = now  # kept retain_s more: tokens signed with it have not all expired
            for kid, new in fresh.items():
                self.keys[kid] = new
            self.broken = broken
            self.fetched_at, self.failed_at, self.last_error = now, None, ""
            self._forget_retired(now)
        if broken:
            logger.error(f"the realm {self.realm_uri} serves keys that cannot be read: {sorted(broken)}")

    def _forget_retired(self, now: float) -> None:
        expired = [kid for kid, k in self.keys.items()
                   if k.retired_at is not None and now - k.retired_at >= self.policy.retain_s]
        for kid in expired:
            del self.keys[kid]

    def _fetch(self) -> tuple[dict[str, RealmKey], set[str]]:
        """(readable keys by kid, kids the realm lists but that cannot be read), within timeout_s in all."""
        deadline = time.monotonic() + self.policy.timeout_s
        base = self.realm_uri.rstrip("/")
        try:
            if self._jwks_uri is None:
                conf = _get_json(f"{base}/.well-known/openid-configuration", deadline, missing_ok=True)
                uri = conf.get("jwks_uri") if isinstance(conf, dict) else None
                self._jwks_uri = uri if isinstance(uri, str) else f"{base}/protocol/openid-connect/certs"
            jwks = _get_json(self._jwks_uri, deadline, missing_ok=True)
            if jwks is not None:
                return _read_jwks(jwks)
            return _read_realm_public_key(_get_json(base, deadline, missing_ok=False))
        except (requests.RequestException, ValueError) as e:
            raise RealmUnavailable(f"cannot read the signing keys of the realm {base}: {type(e).__name__}: "
                                   f"{str(e)[:200]}") from e


def _get_json(url: str, deadline: float, *, missing_ok: bool) -> Any:
    """The JSON at ``url``; None for a 404 when ``missing_ok``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise requests.Timeout(f"no time left for {url}")
    r = requests.get(url, timeout=remaining)
    if r.status_code == 404 and missing_ok:
        return None
    r.raise_for_status()
    return r.json()


def _read_jwks(jwks: Any) -> tuple[dict[str, RealmKey], set[str]]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("the JWK set has no 'keys' list")
    keys: dict[str, RealmKey] = {}
    broken: set[str] = set()
    for entry in jwks["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys and shared secrets never sign access tokens
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else LEGACY
        try:
            jwk = jwt.PyJWK(entry)
            if jwk.algorithm_name not in _SIGNING_ALGORITHMS:
                raise jwt.InvalidKeyError(f"algorithm {jwk.algorithm_name} is not a public-key signature")
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            logger.warning(f"realm key {kid!r} cannot be read: {e}")
            broken.add(kid)
            continue
        keys[kid] = RealmKey(jwk.key, jwk.algorithm_name)
    if not keys and not broken:
        raise ValueError("the JWK set lists no signing key")
    return keys, broken


def _read_realm_public_key(answer: Any) -> tuple[dict[str, RealmKey], set[str]]:
    """Keycloak's realm URL: ``{"public_key": "<base64 DER>"}`` (RS256)."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = answer.get("public_key") if isinstance(answer, dict) else None
    if not isinstance(key, str):
        raise ValueError("the realm URL serves no 'public_key'")
    try:
        public = load_pem_public_key(f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----".encode())
    except (ValueError, TypeError) as e:
        logger.warning(f"the realm's public_key cannot be read: {e}")
        return {}, {LEGACY}
    return {LEGACY: RealmKey(public, "RS256")}, set()
