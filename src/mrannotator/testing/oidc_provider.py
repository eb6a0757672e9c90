"""A real OpenID Connect provider process on 127.0.0.1 for browser tests: PyPI ``oidc-provider-mock`` 0.3.4.

Its login form takes a subject (``sub``); the claims of a subject are set when the process starts
(``--user '{"sub": ..., "roles": [...]}'``, the package's own ``User`` list), and every non-standard claim
(here ``roles``) is put in the ID token and in the ``/userinfo`` answer. Its access tokens are opaque
(authlib's random strings), checked by the provider's ``/userinfo``.

As shipped, 0.3.4 cannot serve a browser application (a public client such as OHIF) with PKCE:
- it registers its authorization-code grant without authlib's RFC 7636 extension and its stored codes have
  no ``code_challenge``: ``code_verifier`` is ignored (any verifier, or none, gets the tokens);
- the grant keeps authlib's token endpoint methods (``client_secret_basic``/``post``): a public client
  (``token_endpoint_auth_method: none``, no secret) is refused;
- it sends no CORS headers, so a page on another origin cannot read its discovery document or its tokens.
:func:`build_app` adds these three with authlib's own classes (``CodeChallenge``, the ``none`` method) and a
CORS header for the one origin given; everything else is the package as published. PKCE is required: an
authorization request without an S256 ``code_challenge`` is refused, and so is a token request whose
``code_verifier`` does not match.

Run: ``python -m mrannotator.testing.oidc_provider --port P --cors-origin URL --user JSON ...``;
:func:`running_provider` starts it on a free port and stops it by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests


def _pkce_grant(base):
    """The package's code grant with PKCE (S256, required) and public clients (``none``) allowed."""
    from authlib.oauth2.rfc6749.errors import InvalidRequestError
    from authlib.oauth2.rfc7636 import CodeChallenge

    challenges: dict[str, tuple[str, str]] = {}  # code -> (code_challenge, method): the package keeps neither

    class Required(CodeChallenge):
        def validate_code_challenge(self, grant, redirect_uri):
            data = grant.request.payload.data
            if data.get("code_challenge_method") != "S256" or not data.get("code_challenge"):
                raise InvalidRequestError("PKCE is required: code_challenge with code_challenge_method S256")
            super().validate_code_challenge(grant, redirect_uri)

        def get_authorization_code_challenge(self, authorization_code):
            return challenges.get(authorization_code.code, (None, None))[0]

        def get_authorization_code_challenge_method(self, authorization_code):
            return challenges.get(authorization_code.code, (None, None))[1]

    class PKCEGrant(base):
        TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]

        def __init__(self, request, server):
            super().__init__(request, server)
            Required(required=True)(self)

        def save_authorization_code(self, code, request):
            data = request.payload.data
            challenges[code] = (data.get("code_challenge"), data.get("code_challenge_method"))
            return super().save_authorization_code(code, request)

    return PKCEGrant


def build_app(users: list[dict], cors_origin: str):
    """The provider's Flask app: ``users`` are claim dicts with ``sub``; CORS for ``cors_origin`` only."""
    import oidc_provider_mock
    from oidc_provider_mock import _app
    from oidc_provider_mock._storage import User

    _app.AuthorizationCodeGrant = _pkce_grant(_app.AuthorizationCodeGrant)  # read by the app's setup
    app = oidc_provider_mock.app(user_claims=[User(sub=u["sub"], claims={k: v for k, v in u.items() if k != "sub"})
                                              for u in users])

    @app.after_request
    def cors(response):
        import flask

        if flask.request.headers.get("Origin") == cors_origin:
            response.headers["Access-Control-Allow-Origin"] = cors_origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cors-origin", required=True, help="the one origin whose pages may call the provider")
    parser.add_argument("--user", action="append", default=[], help='claims as JSON with "sub"')
    args = parser.parse_args(argv)
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # http on 127.0.0.1 (tests only)
    app = build_app([json.loads(u) for u in args.user], args.cors_origin)
    uvicorn.run(app, interface="wsgi", host="127.0.0.1", port=args.port, log_level="warning")


@dataclass
class Provider:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_provider(log: Path, users: list[dict], cors_origin: str, port: int | None = None) -> Iterator[Provider]:
    """The provider as its own process on 127.0.0.1 (``port``: a free one if None), stopped by PID."""
    from .server_support import free_port

    port = port or free_port()
    cmd = [sys.executable, "-m", "mrannotator.testing.oidc_provider", "--port", str(port),
           "--cors-origin", cors_origin, *[a for u in users for a in ("--user", json.dumps(u))]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    provider = Provider(proc, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the OIDC provider exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{provider.url}/.well-known/openid-configuration", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OIDC provider did not answer in 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield provider
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


if __name__ == "__main__":
    main()
