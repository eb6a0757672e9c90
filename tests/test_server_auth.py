"""Token auth with roles on a real MONAI Label server (127.0.0.1) against a local test realm.

The test realm (tests/realm_support.py) is a small HTTP server on 127.0.0.1 serving what Keycloak serves
for a realm: its keys (JWK set and realm URL), the OpenID configuration and a password-grant token endpoint
(used by MONAI Label's /auth/token, as 3D Slicer logs in). Tokens are RS256, minted with PyJWT.
"""

from __future__ import annotations

import time

import jwt
import nibabel as nib
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from mrannotator.phantoms import make_phantom
from mrannotator.testing.realm_support import CLIENT_ID, ROLES
from mrannotator.testing.server_support import body_of, client_status, start_server, stop_server

pytestmark = pytest.mark.timeout(900)


def _adapter():
    from lib import monailabel_adapter

    return monailabel_adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory, realm, demo_weights):
    root = tmp_path_factory.mktemp("auth")
    studies = root / "studies"
    studies.mkdir()
    labels = root / "labels"
    labels.mkdir()
    for i, name in enumerate(("abdomen_a", "abdomen_b", "to_delete")):
        ph = make_phantom("abdomen", seed=8200 + i)
        nib.save(ph.image, studies / f"{name}.nii.gz")
        nib.save(ph.labels, labels / f"{name}.nii.gz")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url,
           "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID}
    srv = start_server(root, studies, demo_weights, env=env)
    yield {"server": srv, "url": srv.url, "studies": studies, "labels": labels, "root": root}
    stop_server(srv)


def _call(server, method, path, token=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, server["url"] + path, headers=headers, timeout=120, **kwargs)


def _operations(server, realm):
    schema = _call(server, "GET", "/openapi.json", realm.token("user")).json()
    return schema, [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]


# ---------------------------------------------------------------------------------------------- upstream
def test_upstream_token_check_still_rejects_valid_rs256_tokens(realm, monkeypatch):
    """MONAI Label 0.8.5 calls jwt.decode without algorithms: with PyJWT 2.x it refuses every token.
    If this starts passing, upstream fixed it and lib/monailabel_adapter.from_token can go."""
    import monailabel.endpoints.user.auth as upstream
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", realm.url)
    with pytest.raises(jwt.DecodeError, match="algorithms"):
        upstream.from_token(realm.token("admin"))
    adapter = _adapter()
    assert adapter.from_token(realm.token("admin")).roles == list(ROLES.values())


def test_upstream_rbac_is_flat_and_differs_from_our_table(server, realm):
    """MONAI Label's own per-endpoint RBAC asks admin to train and only annotator for the dataset ZIP
    (and a token must hold that exact role): the reason the adapter enforces ROUTE_ROLES instead.
    openapi.json states the roles enforced."""
    import inspect

    from monailabel.endpoints import datastore, train

    def upstream_role(endpoint):
        return inspect.signature(endpoint).parameters["user"].default.dependency.roles

    assert upstream_role(train.api_run_model) == ROLES["admin"]
    assert upstream_role(datastore.api_download_dataset) == ROLES["annotator"]
    schema, _ = _operations(server, realm)
    assert schema["paths"]["/train/{model}"]["post"]["x-required-role"] == ROLES["reviewer"]
    assert schema["paths"]["/datastore/dataset"]["get"]["x-required-role"] == ROLES["admin"]
    assert schema["paths"]["/infer/{model}"]["post"]["x-required-role"] == ROLES["annotator"]
    assert schema["paths"]["/auth/token"]["post"]["x-required-role"] == "public"


# ---------------------------------------------------------------------------------------------- 401
def test_every_route_but_auth_needs_a_token_and_declares_it(server, realm):
    adapter = _adapter()
    schema, operations = _operations(server, realm)
    assert len(operations) >= 36
    assert "OAuth2PasswordBearer" in schema["components"]["securitySchemes"]
    unlisted = [op for op in operations if adapter.match_route(*op) is None]
    assert not unlisted, f"routes missing from ROUTE_ROLES (they would need admin): {unlisted}"
    answers = {}
    for method, path in operations:
        url = path.replace("{path:path}", "x").replace("{model}", "mrannotator").replace("{strategy}", "random")
        url = url.replace("{method}", "dice").replace("{session_id}", "s")
        answers[(method, path)] = _call(server, method, url).status_code
        if not path.startswith("/auth/"):
            assert schema["paths"][path][method.lower()].get("security"), (method, path)
    # routes outside the schema too
    for method, path in [("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/reload"),
                         ("GET", "/ohif/index.html"), ("GET", "/viewer/"), ("GET", "/proxy/dicom/qido/studies"),
                         ("GET", "/static/x.css"), ("GET", "/favicon.ico"), ("GET", "/no/such/route")]:
        answers[(method, path)] = _call(server, method, path).status_code
    # /auth/ and /auth/token are open (login), and the OHIF viewer's files (a browser loads them before it logs
    # in); /auth/token/valid checks the token itself
    wrong = {op: s for op, s in answers.items() if (s == 401) == (op[1] in ("/auth/", "/auth/token", "/viewer/"))}
    assert not wrong, wrong
    assert _call(server, "GET", "/auth/").json()["enabled"] is True
    print(f"{len(answers)} routes: {sum(s == 401 for s in answers.values())} answer 401 without a token")


@pytest.mark.parametrize("kind", ["expired", "forged", "wrong_audience", "wrong_issuer", "hs256_with_public_key",
                                  "garbage"])
def test_bad_tokens_get_401(server, realm, kind):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = {
        "expired": lambda: realm.token("admin", expires_in=-120),
        "forged": lambda: realm.token("admin", key=other),
        "wrong_audience": lambda: realm.token("admin", audience="another-app"),
        "wrong_issuer": lambda: realm.token("admin", issuer="http://127.0.0.1:1/realms/evil"),
        # the public key used as an HMAC secret (the classic algorithm confusion)
        "hs256_with_public_key": lambda: jwt.encode({"iss": realm.url, "aud": CLIENT_ID, "exp": time.time() + 300,
                                                     "realm_access": {"roles": [ROLES["admin"]]}},
                                                    realm.public_key_b64, algorithm="HS256"),
        "garbage": lambda: "not.a.token",
    }[kind]()
    for method, path in [("GET", "/info/"), ("GET", "/datastore/dataset"), ("GET", "/auth/token/valid")]:
        r = _call(server, method, path, token)
        assert r.status_code == 401, (kind, path, r.status_code, r.text)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


# ---------------------------------------------------------------------------------------------- roles
def test_annotator_cannot_train_delete_or_download(server, realm):
    tok = realm.token("annotator")
    assert _call(server, "GET", "/info/", tok).status_code == 200
    refused = {
        ("POST", "/train/mrannotator"): _call(server, "POST", "/train/mrannotator", tok, json={}),
        ("POST", "/scoring/dice"): _call(server, "POST", "/scoring/dice", tok),
        ("DELETE", "/datastore/image"): _call(server, "DELETE", "/datastore/image?id=to_delete", tok),
        ("DELETE", "/datastore/label"): _call(server, "DELETE", "/datastore/label?id=abdomen_a&tag=final", tok),
        ("GET", "/datastore/dataset"): _call(server, "GET", "/datastore/dataset", tok),
        ("GET", "/logs/"): _call(server, "GET", "/logs/", tok),
        ("GET", "/model/mrannotator"): _call(server, "GET", "/model/mrannotator", tok),
    }
    assert {op: r.status_code for op, r in refused.items()} == {op: 403 for op in refused}
    assert "monailabel-" in refused[("GET", "/logs/")].json()["detail"]
    assert (server["studies"] / "to_delete.nii.gz").is_file()
    assert _call(server, "GET", "/train/", tok).json().get("status") in (None, "")  # nothing queued
    # a token with no MONAI Label role reads nothing
    assert _call(server, "GET", "/info/", realm.token(None)).status_code == 403


def test_reviewer_trains_but_cannot_delete(server, realm):
    tok = realm.token("reviewer")
    r = _call(server, "POST", "/train/nosuch", tok, json={})  # past the role check, refused as unknown
    assert r.status_code == 404 and "nosuch" in r.json()["detail"]
    assert _call(server, "DELETE", "/datastore/image?id=to_delete", tok).status_code == 403
    assert _call(server, "GET", "/datastore/dataset", tok).status_code == 403


def test_slicer_client_flow_with_a_token(server, realm):
    """MONAILabelClient as 3D Slicer drives it: log in through /auth/token, then info, next sample,
    infer, save label."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server["url"], tmpdir=str(server["root"]), client_id="slicer-anna")
    assert client.auth_enabled()
    status, _ = client_status(client.info)  # no token yet
    assert status == 401
    client.update_auth(client.auth_token("anna", "anna-pw"))
    assert client.auth_valid_token()
    info = client.info()
    assert "mrannotator" in info["models"]
    sample = client.next_sample("random", {})
    assert sample["id"] in {"abdomen_a", "abdomen_b", "to_delete"}
    path, params = client.infer("mrannotator_abdomen", "abdomen_a", {})
    assert nib.load(path).shape == nib.load(server["studies"] / "abdomen_a.nii.gz").shape
    # upstream client bug (the adapter repairs the boundary on the server): the last multipart request's
    # content-type stays in the client's headers once a token is set
    assert "content-type" in {k.lower() for k in client._headers}
    # a volume the server does not hold goes through a session, as Slicer sends local volumes
    session_id = client.create_session(str(server["studies"] / "abdomen_b.nii.gz"))["session_id"]
    session_path, _ = client.infer("mrannotator_abdomen", "", {}, session_id=session_id)
    assert nib.load(session_path).shape == nib.load(server["studies"] / "abdomen_b.nii.gz").shape
    client.save_label("abdomen_a", str(server["labels"] / "abdomen_a.nii.gz"), "final")
    assert client.info()["name"] == "MRAnnotator"  # the client keeps working after multipart requests
    stored = server["studies"] / "labels" / "final" / "abdomen_a.nii.gz"
    assert stored.is_file()
    # a wrong password is refused, and the annotator still cannot delete
    bad = MONAILabelClient(server["url"], tmpdir=str(server["root"]))
    assert client_status(bad.auth_token, "anna", "wrong")[0] == 401
    token = client._headers["Authorization"].split()[1]
    assert _call(server, "DELETE", "/datastore/label?id=abdomen_a&tag=final", token).status_code == 403
    assert stored.is_file()


def test_admin_can_delete_download_and_read_logs(server, realm):
    tok = realm.token("admin")
    assert _call(server, "POST", "/train/nosuch", tok, json={}).status_code == 404  # past the role check
    r = _call(server, "GET", "/datastore/dataset", tok)
    assert r.status_code == 200 and r.content[:2] == b"PK"
    logs = _call(server, "GET", "/logs/?lines=2000&text=true", tok)
    assert logs.status_code == 200 and "MRAnnotator" in logs.text
    assert _call(server, "DELETE", "/datastore/image?id=to_delete", tok).status_code == 200
    assert not (server["studies"] / "to_delete.nii.gz").exists()
    assert "to_delete" not in _call(server, "GET", "/datastore/?output=all", tok).json()["objects"]
    assert body_of(_call(server, "GET", "/auth/token/valid", tok))["roles"] == list(ROLES.values())
