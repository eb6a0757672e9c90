"""Auth availability and HTTP hygiene on a real MONAI Label server (127.0.0.1) with a real test realm.

The realm (tests/realm_support.py) is a Keycloak-like HTTP server whose key endpoints can hang or serve
an unreadable key, and whose keys rotate. The server runs with short settings so that timeouts can be
watched: key fetch failures remembered 2 s, idle sockets closed after 2 s, headers within 3 s, a body
stalled 3 s closed, at most 40 open connections.

- a hanging realm costs one bounded wait (<= 3 s) to the one request that needs a new key; requests
  with cached keys answer meanwhile, and later ones get 503 at once (negative cache);
- a realm serving an unreadable key: 503 for tokens signed with it, 200 for tokens on cached keys;
- rotation (Keycloak, JWKS by kid): new-key tokens accepted at once, old-key tokens until they expire;
- ID and refresh tokens (Keycloak's typ) are not access tokens: 401;
- a 1 MB query string gets 414 and a 200 KB token 431 (not a reset); HEAD and OPTIONS are answered;
- idle, slow-header and stalled-body sockets are closed; at the connection cap idle sockets make room.
"""

from __future__ import annotations

import socket
import threading
import time

import jwt
import nibabel as nib
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing.realm_support import CLIENT_ID, Realm, new_key
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

FETCH_BOUND_S = 3.0  # the bound for the one request that waits (the server's fetch cap: 2.5 s)
SLACK_S = 0.8  # a shared 2-core machine
IDLE_S, HEADER_S, BODY_S, MAX_CONNECTIONS = 2, 3, 3, 40
RETRY_S, MIN_REFRESH_S = 2, 1  # the server's negative cache and rate limit on key fetches


@pytest.fixture(scope="module")
def server(tmp_path_factory, realm, demo_weights):
    root = tmp_path_factory.mktemp("realm_http")
    studies = root / "studies"
    studies.mkdir()
    nib.save(make_phantom("abdomen", seed=8300).image, studies / "abdomen_a.nii.gz")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url,
           "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID, "MRANNOTATOR_AUTH_KEY_RETRY_S": str(RETRY_S),
           "MRANNOTATOR_AUTH_KEY_MIN_REFRESH_S": str(MIN_REFRESH_S), "MRANNOTATOR_HTTP_IDLE_TIMEOUT_S": str(IDLE_S),
           "MRANNOTATOR_HTTP_HEADER_TIMEOUT_S": str(HEADER_S), "MRANNOTATOR_HTTP_BODY_TIMEOUT_S": str(BODY_S),
           "MRANNOTATOR_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    srv = start_server(root, studies, demo_weights, env=env)
    yield srv
    stop_server(srv)


def _info(server, token, **kwargs) -> tuple[int, float, requests.Response]:
    t0 = time.monotonic()
    r = requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)
    return r.status_code, time.monotonic() - t0, r


def _ok_realm(realm):
    realm.mode = "ok"
    time.sleep(RETRY_S + 0.2)  # past the server's negative cache


# ---------------------------------------------------------------------------------------------- realm
def test_hanging_realm_costs_one_bounded_wait_to_one_request(server, realm):
    cached = realm.token("user")
    assert _info(server, cached)[0] == 200  # the server now holds k1
    realm.mode = "hang"
    realm.rotate("k2", drop_old=False)  # tokens signed with k2 need a fetch; the realm hangs
    time.sleep(MIN_REFRESH_S + 0.2)
    others: list[tuple[int, float]] = []
    stop = threading.Event()

    def meanwhile():
        while not stop.is_set():
            others.append(_info(server, cached)[:2])
            time.sleep(0.1)

    fetches = realm.key_fetches
    worker = threading.Thread(target=meanwhile)
    worker.start()
    try:
        time.sleep(0.3)
        status, waited, r = _info(server, realm.token("user"))
    finally:
        stop.set()
        worker.join()
    print(f"new-key token on a hanging realm: {status} after {waited:.2f} s; cached-key requests meanwhile: "
          f"{len(others)}, slowest {max(t for _, t in others):.2f} s")
    assert status == 503 and r.headers.get("retry-after") and "identity provider" in r.json()["detail"]
    assert waited <= FETCH_BOUND_S + SLACK_S, waited
    assert len(others) >= 5 and {s for s, _ in others} == {200}
    assert max(t for _, t in others) < 1.0, others  # nothing else waited for the realm
    # the failure is remembered: more new-key and forged tokens are answered at once, with no fetch
    t0 = time.monotonic()
    forged = [realm.token("admin", key=new_key(), kid=f"forged-{i}") for i in range(3)]
    answers = [_info(server, t)[0] for t in [realm.token("user"), *forged]]
    assert answers == [503] * 4 and time.monotonic() - t0 < 1.5
    assert realm.key_fetches == fetches + 1
    _ok_realm(realm)
    assert _info(server, realm.token("user"))[0] == 200  # the realm is back: k2 fetched
    assert _info(server, cached)[0] == 200


def test_unreadable_key_gets_503_for_its_tokens_only(server, realm):
    cached = realm.token("user")
    assert _info(server, cached)[0] == 200
    realm.mode = "bad"
    realm.rotate("k3", drop_old=False)
    time.sleep(MIN_REFRESH_S + 0.2)
    status, waited, r = _info(server, realm.token("user"))
    assert status == 503, r.text
    assert _info(server, cached)[0] == 200  # tokens on cached keys keep working
    assert _info(server, realm.token("user", kid="k1"))[0] == 200
    _ok_realm(realm)
    assert _info(server, realm.token("user"))[0] == 200  # the realm fixed: k3 read


def test_rotation_accepts_old_and_new_tokens_until_they_expire(server, realm):
    old = realm.token("user", expires_in=120)
    old_expired = realm.token("user", expires_in=-60)  # past the 10 s clock-skew leeway
    assert _info(server, old)[0] == 200
    realm.rotate("k4", drop_old=True)  # a hard rotation: the JWK set lists only the new key
    time.sleep(MIN_REFRESH_S + 0.2)
    status, waited, r = _info(server, realm.token("user"))
    assert status == 200 and waited < FETCH_BOUND_S, r.text  # at once, not after a cache period
    assert _info(server, old)[0] == 200  # signed with a key the realm dropped, still valid
    r = _info(server, old_expired)[2]
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    forged = realm.token("admin", key=new_key(), kid="k4")  # the new kid, another key
    assert _info(server, forged)[0] == 401


@pytest.mark.parametrize("typ", ["ID", "Refresh", None])
def test_id_and_refresh_tokens_are_not_access_tokens(server, realm, typ):
    status, _, r = _info(server, realm.token("admin", typ=typ))
    assert status == 401 and "typ Bearer" in r.json()["detail"], r.text
    assert _info(server, realm.token("admin"))[0] == 200


def test_realm_url_public_key_still_read(monkeypatch):
    """A realm that serves no JWK set (the realm URL's public_key form): read in-process."""
    from lib.monailabel_adapter import auth
    from monailabel.config import settings

    legacy = Realm()
    legacy.mode = "legacy"
    try:
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", legacy.url)
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_CLIENT_ID", CLIENT_ID)
        token = jwt.encode({**jwt.decode(legacy.token("user"), options={"verify_signature": False})},
                           legacy.key, algorithm="RS256")  # no kid, as the realm URL's single key signs
        assert auth.verify_token(token)["realm_access"]["roles"] == ["monailabel-user"]
        with pytest.raises(jwt.InvalidSignatureError):
            auth.verify_token(legacy.token("user", key=new_key()))
    finally:
        legacy.stop()


def test_dropped_key_is_kept_only_for_the_retention_time(monkeypatch):
    """In-process: after a hard rotation the old key verifies tokens for MRANNOTATOR_AUTH_KEY_RETAIN_S only."""
    from lib.monailabel_adapter import auth
    from monailabel.config import settings

    realm = Realm()  # a realm of its own: its key cache is created with the settings below
    try:
        monkeypatch.setenv("MRANNOTATOR_AUTH_KEY_RETAIN_S", "1.5")
        monkeypatch.setenv("MRANNOTATOR_AUTH_KEY_MIN_REFRESH_S", "0")
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", realm.url)
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_CLIENT_ID", CLIENT_ID)
        old = realm.token("user")
        assert auth.verify_token(old)["sub"] == "user-id"
        realm.rotate("k2", drop_old=True)
        assert auth.verify_token(realm.token("user"))["sub"] == "user-id"  # fetched: k1 now retired
        assert auth.verify_token(old)["sub"] == "user-id"
        time.sleep(1.6)
        with pytest.raises(jwt.InvalidTokenError, match="does not list"):
            auth.verify_token(old)
    finally:
        realm.stop()


# ---------------------------------------------------------------------------------------------- HTTP
def test_long_query_gets_414_and_big_header_431(server, realm):
    token = realm.token("user")
    r = requests.get(f"{server.url}/info/?q={'a' * 1_000_000}", headers={"Authorization": f"Bearer {token}"},
                     timeout=30)
    assert r.status_code == 414 and "query string" in r.json()["detail"]
    r = requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {'x' * 200_000}"}, timeout=30)
    assert r.status_code == 431 and "headers" in r.json()["detail"]
    assert _info(server, token)[0] == 200


def test_head_and_options_are_answered(server, realm):
    token = realm.token("user")
    head = requests.head(f"{server.url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    get = _info(server, token)[2]
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert requests.head(f"{server.url}/info/", timeout=30).status_code == 401  # HEAD needs GET's role
    r = requests.options(f"{server.url}/datastore/label", timeout=30)
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}
    assert requests.options(f"{server.url}/info/", timeout=30).headers["allow"] == "GET, HEAD, OPTIONS"
    assert requests.options(f"{server.url}/no/such/route", timeout=30).status_code == 404


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (reading what it sends); fails past ``limit``."""
    t0, got = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk


def test_idle_and_slow_sockets_are_closed(server, realm):
    fresh = _connect(server)
    waited, _ = _closed_after(fresh, IDLE_S + 5)
    assert IDLE_S - 0.5 <= waited <= IDLE_S + SLACK_S
    # keep-alive after an answer
    kept = _connect(server)
    kept.sendall(f"GET /info/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {realm.token('user')}\r\n\r\n".encode())
    waited, got = _closed_after(kept, 30)
    assert got.startswith(b"HTTP/1.1 200") and waited <= IDLE_S + SLACK_S + 1.0
    # headers sent a byte at a time (slowloris): 408 after the header timeout
    slow = _connect(server)
    slow.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\n")
    t0, got = time.monotonic(), b""
    slow.settimeout(0.4)
    while time.monotonic() - t0 < HEADER_S + 5:
        try:
            slow.sendall(b"X")
            chunk = slow.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 <= HEADER_S + SLACK_S + 0.5, got
    # a body that stops: closed after the body timeout
    stalled = _connect(server)
    stalled.sendall(b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 1000\r\n\r\nusername=a")
    waited, _ = _closed_after(stalled, BODY_S + 10)
    assert waited <= BODY_S + SLACK_S + 1.0
    for s in (fresh, kept, slow, stalled):
        s.close()


def test_idle_sockets_make_room_at_the_connection_cap(server, realm):
    token = realm.token("user")
    idle = [_connect(server) for _ in range(MAX_CONNECTIONS + 20)]
    try:
        status, waited, _ = _info(server, token)
        assert status == 200 and waited < 1.0
        time.sleep(0.2)
        closed = 0
        for s in idle:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
        assert closed >= 20  # the oldest idle ones, well before the idle timeout
    finally:
        for s in idle:
            s.close()
