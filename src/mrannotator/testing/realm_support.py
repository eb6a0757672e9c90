"""A Keycloak-like realm on 127.0.0.1 for tests: a real HTTP server with its own RSA keys.

It serves what Keycloak serves for a realm: the realm URL with its RSA public key (``public_key``), the
OpenID configuration, the JWK set (``protocol/openid-connect/certs``, one entry per ``kid``) and a
password-grant token endpoint (MONAI Label's /auth/token, as 3D Slicer logs in). Tokens are RS256, minted
with PyJWT, with Keycloak's ``typ`` claim. ``mode`` makes the key endpoints misbehave: ``hang`` (answer
after ``hang_s``), ``bad`` (the JWK set's entries and the realm URL's key are unreadable), ``legacy``
(no OpenID configuration or JWK set: the realm URL's ``public_key`` only).
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
import urllib.parse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CLIENT_ID = "monailabel-app"
ROLES = {"user": "monailabel-user", "annotator": "monailabel-annotator", "reviewer": "monailabel-reviewer",
         "admin": "monailabel-admin"}
PASSWORDS = {"anna": ("annotator", "anna-pw"), "ada": ("admin", "ada-pw")}
KEY_PATHS = ("/realms/test", "/realms/test/protocol/openid-connect/certs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Realm:
    """A Keycloak-like realm on 127.0.0.1. ``keys``: kid -> private key; ``served``: the kids its JWK set
    lists; ``active``: the kid new tokens are signed with."""

    def __init__(self):
        self.keys = {"k1": new_key()}
        self.served = ["k1"]
        self.active = "k1"
        self.mode = "ok"
        self.hang_s = 20.0
        self.key_fetches = 0
        self._release = threading.Event()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/realms/test"
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def key(self):
        return self.keys[self.active]

    @property
    def public_key_b64(self) -> str:
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def rotate(self, kid: str, *, drop_old: bool) -> None:
        """A new active key; with ``drop_old`` the JWK set lists only the new one (a hard rotation)."""
        self.keys[kid] = new_key()
        self.served = [kid] if drop_old else [*self.served, kid]
        self.active = kid

    def jwks(self) -> dict:
        keys = []
        for kid in self.served:
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
            if self.mode == "bad":
                jwk["n"] = "not-a-modulus!"
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        # Keycloak also lists its encryption key; it never signs tokens
        encryption = {"kty": "RSA", "use": "enc", "kid": "enc-1", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"}
        return {"keys": [*keys, encryption]}

    def _answer(self, path: str) -> tuple[int, dict]:
        if path in KEY_PATHS:
            self.key_fetches += 1
            if self.mode == "hang":
                self._release.wait(self.hang_s)
        if self.mode == "legacy" and path != "/realms/test":
            return 404, {"error": "not found"}  # an older realm: only the realm URL's public_key
        if path == "/realms/test":
            key = "bm90IGEga2V5" if self.mode == "bad" else self.public_key_b64
            return 200, {"realm": "test", "public_key": key}
        if path == "/realms/test/.well-known/openid-configuration":
            return 200, {"issuer": self.url, "jwks_uri": f"{self.url}/protocol/openid-connect/certs",
                         "token_endpoint": f"{self.url}/protocol/openid-connect/token"}
        if path == "/realms/test/protocol/openid-connect/certs":
            return 200, self.jwks()
        return 404, {"error": "not found"}

    def _handler(self):
        realm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the server under test gave up waiting
                    pass

            def do_GET(self):
                self._json(*realm._answer(self.path))

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user, password = form.get("username", [""])[0], form.get("password", [""])[0]
                if (self.path != "/realms/test/protocol/openid-connect/token" or form.get("client_id") != [CLIENT_ID]
                        or PASSWORDS.get(user, (None, None))[1] != password):
                    return self._json(401, {"error": "invalid_grant"})
                return self._json(200, {"access_token": realm.token(PASSWORDS[user][0], username=user),
                                        "token_type": "Bearer", "expires_in": 300})

            def log_message(self, *args):
                pass

        return Handler

    def token(self, role: str | None, *, username: str | None = None, key=None, kid: str | None = None,
              audience=CLIENT_ID, issuer: str | None = None, expires_in: float = 300, algorithm: str = "RS256",
              typ: str | None = "Bearer") -> str:
        """A token as Keycloak mints it; ``kid`` defaults to the active key's (``key`` given: no kid)."""
        now = int(time.time())
        claims = {"iss": issuer or self.url, "aud": audience, "iat": now, "exp": now + expires_in,
                  "sub": username or f"{role}-id", "preferred_username": username or f"{role or 'nobody'}-user",
                  "azp": CLIENT_ID, "realm_access": {"roles": [ROLES[role]] if role else ["offline_access"]}}
        if typ is not None:
            claims["typ"] = typ
        if key is not None:
            return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)
        kid = kid or self.active
        return jwt.encode(claims, self.keys[kid], algorithm=algorithm, headers={"kid": kid})

    def stop(self):
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
