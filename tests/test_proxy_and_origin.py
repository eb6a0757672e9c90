"""Hostile web requests on a real server with auth on, over a real Orthanc: the DICOMweb proxy
(escapes with every role, STOW roles, the PACS's challenge, includefield) and cross-origin requests
(an allow-listed site, any other site), all on 127.0.0.1.

Orthanc runs with ``--verbose``, so the test reads from its log every request that reached the PACS.
"""

from __future__ import annotations

import http.client
import json
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import write_series
from mrannotator.testing.realm_support import CLIENT_ID
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = [pytest.mark.pacs, pytest.mark.timeout(900)]

STUDY = "1.2.826.0.1.3680043.8.498.7"
DESCRIPTION = "MRAnnotator proxy study"
ALLOWED = "http://viewer.example:9000"
EVIL = "http://evil.example"
ROLES = (None, "user", "annotator", "reviewer", "admin")  # None: a token without any MONAI Label role
# requests a read-only token once used to reach the PACS outside DICOMweb (issue 20), and relatives
HOSTILE = [
    ("GET", "/proxy/dicom/..%2F..%2Fsystem"),
    ("GET", "/proxy/dicom/wado/..%2F..%2F..%2Fpatients"),
    ("POST", "/proxy/dicom/..%2F..%2Ftools%2Fshutdown"),
    ("GET", "/proxy/dicom/qido/../../system"),
    ("GET", "/proxy/dicom/qido/%2e%2e/%2e%2e/patients"),
    ("GET", "/proxy/dicom/studies/..%252F..%252F..%252Fsystem"),
    ("GET", "/proxy/dicom/qido/..%5C..%5Csystem"),
    ("GET", "/proxy/dicom//system"),
    ("GET", "/proxy/dicom/qido/patients"),
    ("GET", "/proxy/dicom/wado/instances/abc/file"),
    ("GET", f"/proxy/dicom/wado/studies/{STUDY}%2F..%2F..%2F..%2Fsystem/metadata"),
    ("GET", "/proxy/dicom/qido/studies?StudyInstanceUID=1%00"),
    ("POST", "/proxy/dicom/stow/..%2F..%2Finstances"),
    ("POST", "/proxy/dicom/wado/..%2F..%2Ftools%2Freset"),
    ("POST", f"/proxy/dicom/qido/studies/{STUDY}/series"),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy_dicom")
    files = write_series(make_phantom("abdomen", seed=8400).image, root / "mr", study_instance_uid=STUDY,
                         series_description="T2 proxy", study_description=DESCRIPTION)
    server = orthanc_support.RestartableOrthanc(tmp_path_factory.mktemp("proxy_orthanc"))
    orthanc_support.store_files(server, files)
    server.files = files
    server.series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(pacs, realm, tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("proxy_server")
    env = {**pacs.env(), "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"), "MONAI_LABEL_AUTH_ENABLE": "true",
           "MONAI_LABEL_AUTH_REALM_URI": realm.url, "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID,
           "MRANNOTATOR_CORS_ORIGINS": ALLOWED}
    t0 = time.monotonic()
    srv = start_server(root, pacs.dicomweb_url, demo_weights, env=env)
    print(f"\nstart-up with the PACS up: {time.monotonic() - t0:.1f} s")
    yield srv
    stop_server(srv)


def _raw(server, method, target, token=None, body=b"", headers=None):
    """One request with the target sent exactly as written (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    conn.request(method, target, body=body, headers=h)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def _token(realm, role):
    return realm.token(role)


def _stow_body(files, series_uid: str) -> tuple[bytes, str]:
    """A STOW-RS body (multipart/related) with one instance copied into a new series."""
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    boundary = "mrannotatorboundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue()
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _in_pacs(pacs, series_uid) -> bool:
    r = requests.get(f"{pacs.dicomweb_url}/series?SeriesInstanceUID={series_uid}", headers=pacs.auth_header(),
                     timeout=30)
    return r.status_code == 200 and bool(r.content) and len(r.json()) == 1


# ---------------------------------------------------------------------------------------------- proxy
def test_proxy_escapes_are_refused_with_every_role_and_never_reach_the_pacs(server, pacs, realm):
    offset = pacs.log_offset()
    got, expected = {}, {}
    for role in ("no token", *ROLES):
        token = None if role == "no token" else _token(realm, role)
        status, _, body = _raw(server, "GET", "/proxy/dicom/qido/studies", token)
        got[(role, "GET legit")] = status
        expected[(role, "GET legit")] = {"no token": 401, None: 403}.get(role, 200)
        for method, target in HOSTILE:
            status, headers, body = _raw(server, method, target, token)
            got[(role, method, target)] = status
            if role == "no token":
                expected[(role, method, target)] = 401
            elif role is None or (role == "user" and method == "POST"):  # STOW (POST) needs an annotator
                expected[(role, method, target)] = 403
            else:
                expected[(role, method, target)] = 400
                assert "detail" in json.loads(body), body
                if ".." in target or "%2e%2e" in target or "%252F" in target:
                    assert "'..'" in json.loads(body)["detail"] or "not a DICOMweb resource" in body.decode()
            assert b"DicomAet" not in body and b"MRANNOTATOR" not in body  # nothing of Orthanc's /system
    wrong = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert not wrong, wrong
    reached = pacs.requests_since(offset)
    assert reached and all(r.split()[1].startswith("/dicom-web/") for r in reached), reached
    assert requests.get(f"{pacs.url}/system", headers=pacs.auth_header(), timeout=10).status_code == 200
    print(f"\n{len(got)} proxy requests; reached the PACS: {sorted(set(reached))}")


def test_stow_through_the_proxy_needs_an_annotator(server, pacs, realm):
    for role, allowed in (("user", False), (None, False), ("annotator", True)):
        series = pydicom.uid.generate_uid()
        body, content_type = _stow_body(pacs.files, series)
        status, _, answer = _raw(server, "POST", "/proxy/dicom/wado/studies", _token(realm, role), body,
                                 {"Content-Type": content_type, "Accept": "application/dicom+json"})
        assert (status == 200) == allowed, (role, status, answer[:300])
        assert _in_pacs(pacs, series) == allowed, role
    status, _, answer = _raw(server, "POST", "/proxy/dicom/stow/studies", None, body, {"Content-Type": content_type})
    assert status == 401


def test_includefield_with_an_encoded_comma_brings_the_study_description(server, pacs, realm):
    query = "includefield=00081030%2C00080060"
    direct = requests.get(f"{pacs.dicomweb_url}/studies?{query}", headers=pacs.auth_header(), timeout=30).json()
    assert "00081030" not in direct[0]  # Orthanc ignores the encoded comma: the reason for the rewrite
    status, headers, body = _raw(server, "GET", f"/proxy/dicom/qido/studies?{query}&limit=101",
                                 _token(realm, "user"), headers={"Accept": "application/dicom+json"})
    assert status == 200, body
    studies = json.loads(body)
    assert studies[0]["00081030"]["Value"] == [DESCRIPTION]
    assert headers["content-type"].startswith("application/dicom+json")


def test_the_pacs_challenge_is_never_forwarded_and_credentials_are_named(server, pacs, realm):
    status, headers, _ = _raw(server, "GET", "/proxy/dicom/qido/studies/1.2.3/series", _token(realm, "user"))
    assert status == 200 or status == 404 or status == 204, status  # an unknown study, answered by Orthanc
    right = pacs.password
    pacs.start(password="rotated-by-the-pacs-admin")
    try:
        time.sleep(3.5)  # past any earlier failure's retry interval
        t0 = time.monotonic()
        status, headers, body = _raw(server, "GET", "/proxy/dicom/qido/studies", _token(realm, "user"))
        took = time.monotonic() - t0
    finally:
        pacs.start(password=right)
    assert status == 503 and took < 5, (status, took)
    assert "www-authenticate" not in headers
    detail = json.loads(body)["detail"]
    assert "MONAI_LABEL_DICOMWEB_USERNAME" in detail and pacs.dicomweb_url in detail
    assert "identity provider" not in detail
    time.sleep(3.5)
    assert _raw(server, "GET", "/proxy/dicom/qido/studies", _token(realm, "user"))[0] == 200


# ---------------------------------------------------------------------------------------------- origins
def _draft(server, pacs, realm, tmp_path) -> str:
    """A draft label in the server's cache (a deletable thing), returned as its DELETE path."""
    token = _token(realm, "annotator")
    status, _, body = _raw(server, "GET", f"/datastore/image?image={pacs.series}", token)
    assert status == 200, body[:300]
    (tmp_path / "image.nii.gz").write_bytes(body)
    image = nib.load(tmp_path / "image.nii.gz")
    data = np.zeros(image.shape, np.uint8)
    data[5:15, 5:15, 3:8] = 1
    nib.save(nib.Nifti1Image(data, image.affine), tmp_path / "draft.nii.gz")
    with open(tmp_path / "draft.nii.gz", "rb") as f:
        r = requests.put(f"{server.url}/datastore/label?image={pacs.series}&tag=draft", timeout=120,
                         files={"label": ("draft.nii.gz", f)}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return f"/datastore/label?id={pacs.series}&tag=draft"


def _draft_exists(server, pacs, realm) -> bool:
    status, _, _ = _raw(server, "GET", f"/datastore/label?label={pacs.series}&tag=draft", _token(realm, "user"))
    return status == 200


def test_cross_origin_requests_with_auth(server, pacs, realm, tmp_path):
    admin = _token(realm, "admin")
    delete = _draft(server, pacs, realm, tmp_path)
    # another site, with a valid admin token (e.g. taken from storage by a script) or without any
    for token in (admin, None):
        status, _, body = _raw(server, "DELETE", delete, token, headers={"Origin": EVIL})
        assert status == 403 and EVIL in json.loads(body)["detail"], body
    status, _, _ = _raw(server, "DELETE", delete, admin, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert _draft_exists(server, pacs, realm)
    # reads from another site are not readable by its page: no CORS headers, no preflight permission
    status, headers, _ = _raw(server, "GET", "/info/", admin, headers={"Origin": EVIL})
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = _raw(server, "OPTIONS", delete, None, headers={
        "Origin": EVIL, "Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "authorization"})
    assert status >= 400 and "access-control-allow-origin" not in headers  # the browser sends no DELETE
    # the allow-listed site: CORS answers and its DELETE goes through (role rules still apply)
    status, headers, _ = _raw(server, "OPTIONS", delete, None, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    status, headers, _ = _raw(server, "GET", "/info/", admin, headers={"Origin": ALLOWED})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    status, _, _ = _raw(server, "DELETE", delete, _token(realm, "annotator"), headers={"Origin": ALLOWED})
    assert status == 403 and _draft_exists(server, pacs, realm)  # an annotator may not delete
    # behind an authenticating reverse proxy the public host name arrives (no rebinding check with auth)
    status, _, _ = _raw(server, "POST", "/activelearning/random", _token(realm, "annotator"), b"{}",
                        {"Host": "annotation.example.org", "Origin": "https://annotation.example.org",
                         "Content-Type": "application/json"})
    assert status == 200
    # same origin (the served OHIF): works
    status, _, body = _raw(server, "DELETE", delete, admin, headers={"Origin": server.url,
                                                                     "Sec-Fetch-Site": "same-origin"})
    assert status == 200, body
    assert not _draft_exists(server, pacs, realm)
