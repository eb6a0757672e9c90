"""The rules behind the DICOMweb proxy, the cross-site guard and the PACS guard, case by case (no server).

The servers that apply them are tested in test_proxy_and_origin.py and test_pacs_outage.py.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests
from lib import pacs
from lib.monailabel_adapter import origin
from lib.monailabel_adapter.dicomweb_proxy import ProxyRefused, dicomweb_resource, forwarded_query

pytestmark = pytest.mark.unit

S, SE, INST = "1.2.840.113619.2.55.3", "1.3.12.2.1107.5.2", "2.25.1234567890"

# what the bundled OHIF asks (study list, series, metadata, frames, thumbnails, SEG retrieve, STOW)
OHIF_REQUESTS = [
    ("GET", "studies", "qido"), ("GET", f"studies/{S}/series", "qido"),
    ("GET", f"studies/{S}/series/{SE}/instances", "qido"), ("GET", "series", "qido"),
    ("GET", f"studies/{S}/series/{SE}/metadata", "wado"), ("GET", f"studies/{S}/metadata", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}/frames/1", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}/frames/1,2,3/rendered", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}/thumbnail", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}/bulk/7fe00010", "wado"),
    ("GET", f"studies/{S}/series/{SE}/instances/{INST}/bulk/00540016/0/00181074", "wado"),
    ("POST", "studies", "stow"), ("POST", f"studies/{S}", "stow"),
]


@pytest.mark.parametrize("method,path,kind", OHIF_REQUESTS)
def test_ohif_requests_are_forwarded(method, path, kind):
    assert dicomweb_resource(method, path) == (kind, path)


@pytest.mark.parametrize("path", ["../../system", "..%2F..%2Fsystem", "studies/%2e%2e/%2e%2e/patients",
                                  "studies/..%252F..%252Fsystem", "..%5C..%5Csystem", f"studies/{S}/../../tools"])
def test_dot_segments_however_encoded_are_refused_by_name(path):
    with pytest.raises(ProxyRefused, match=r"'\.\.'") as e:
        dicomweb_resource("GET", path)
    assert e.value.status == 400


@pytest.mark.parametrize("method,path,status", [
    ("GET", "patients", 400), ("GET", "/system", 400), ("GET", "studies//series", 400),
    ("GET", "studies/1..2/series", 400), ("GET", "studies/abc/series", 400), ("GET", "tools/find", 400),
    ("GET", "studies/1%00/series", 400), ("GET", "%25252525252e%25252525252e", 400),
    ("POST", f"studies/{S}/series", 400), ("POST", "tools/shutdown", 400), ("PUT", "studies", 405),
    ("DELETE", f"studies/{S}", 405)])
def test_anything_else_is_refused_before_the_pacs(method, path, status):
    with pytest.raises(ProxyRefused) as e:
        dicomweb_resource(method, path)
    assert e.value.status == status and str(e.value)


def test_includefield_lists_become_one_parameter_each_with_literal_commas_elsewhere():
    q = forwarded_query(b"includefield=00081030%2C00080060&includefield=0020000D&limit=101&offset=0"
                        b"&PatientName=*Doe%5EJ*&ModalitiesInStudy=MR%2CCT&fuzzymatching=true")
    assert q == ("includefield=00081030&includefield=00080060&includefield=0020000D&limit=101&offset=0"
                 "&PatientName=*Doe%5EJ*&ModalitiesInStudy=MR,CT&fuzzymatching=true")
    assert forwarded_query(b"") == ""
    with pytest.raises(ProxyRefused) as e:
        forwarded_query(b"PatientID=1%00")
    assert e.value.status == 400
    with pytest.raises(ProxyRefused) as e:
        forwarded_query(b"x=" + b"a" * 9000)
    assert e.value.status == 414


# ---------------------------------------------------------------------------------------------- origins
def _scope(method, host="127.0.0.1:8000", **headers):
    pairs = [(b"host", host.encode())] if host else []
    pairs += [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "path": "/datastore/label", "scheme": "http", "headers": pairs}


ALLOWED = frozenset({"https://viewer.example.org:443", "http://10.0.0.5:3000"})


@pytest.mark.parametrize("scope,refused", [
    (_scope("DELETE", origin="http://evil.example"), True),
    (_scope("DELETE", origin="null"), True),
    (_scope("PUT", origin="http://127.0.0.1:8001"), True),  # another port: another origin
    (_scope("POST", sec_fetch_site="cross-site"), True),
    (_scope("POST", sec_fetch_site="same-site"), True),
    (_scope("DELETE", origin="http://127.0.0.1:8000"), False),
    (_scope("DELETE", origin="http://127.0.0.1:8000", sec_fetch_site="same-origin"), False),
    (_scope("POST", origin="https://viewer.example.org"), False),  # allow-listed (default port)
    (_scope("POST", origin="http://10.0.0.5:3000"), False),
    (_scope("POST", origin="http://10.0.0.5:3001"), True),
    (_scope("POST"), False),  # no browser: 3D Slicer, scripts
    (_scope("GET", origin="http://evil.example", sec_fetch_site="cross-site"), False),  # readable? no CORS
    (_scope("POST", host="[::1]:8000", origin="http://[::1]:8000"), False),
    (_scope("POST", host="localhost:8000", origin="http://localhost:8000"), False),
])
def test_cross_site_state_changes_are_refused(scope, refused):
    assert (origin.cross_site_refusal(scope, ALLOWED, check_host=True) is not None) == refused


def test_a_rebinding_host_is_refused_when_the_host_is_checked():
    scope = _scope("GET", host="evil.example:8000")
    assert "rebinding" in origin.cross_site_refusal(scope, frozenset(), check_host=True)
    assert origin.cross_site_refusal(scope, frozenset(), check_host=False) is None
    # behind a reverse proxy (no port in Host) the host decides
    behind = _scope("POST", host="annotate.hospital.org", origin="https://annotate.hospital.org")
    assert origin.cross_site_refusal(behind, frozenset(), check_host=False) is None


def test_the_allow_list_setting_is_checked(monkeypatch):
    monkeypatch.setenv(origin.CORS_SETTING, "https://viewer.example.org, http://10.0.0.5:3000")
    assert origin.allowed_origins() == ALLOWED
    for bad in ("*", "viewer.example.org", "https://viewer.example.org/ohif", "ftp://x.example"):
        monkeypatch.setenv(origin.CORS_SETTING, bad)
        with pytest.raises(ValueError, match=origin.CORS_SETTING):
            origin.allowed_origins()
    monkeypatch.delenv(origin.CORS_SETTING)
    assert origin.allowed_origins() == frozenset()


# ---------------------------------------------------------------------------------------------- PACS guard
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def test_a_pacs_that_is_down_fails_fast_after_the_first_failure():
    url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
    client = pacs.guarded_client(url, "u", "p")
    with pytest.raises(pacs.PacsUnavailable) as e:
        client.search_for_series()
    assert e.value.status_code == 503 and url in e.value.detail and "running" in e.value.detail
    t0 = time.monotonic()
    with pytest.raises(pacs.PacsUnavailable):
        client.search_for_studies()  # within the retry interval: no network at all
    assert time.monotonic() - t0 < 0.05
    assert client.health.down == e.value.detail
    # whole series and STOW: a longer read timeout (callers probe with a quick search first)
    assert pacs.is_transfer("retrieve_series") and pacs.is_transfer("store_instances")
    assert not pacs.is_transfer("retrieve_series_metadata") and not pacs.is_transfer("search_for_series")
    assert client._wrapped._timeout == pacs.timeouts()
    assert client._transfer._timeout == (pacs.CONNECT_TIMEOUT_S, pacs.TRANSFER_READ_TIMEOUT_S)


def test_pacs_answers_map_to_messages():
    health = pacs.PacsHealth("http://pacs.example/dicom-web")

    def http_error(status):
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    assert pacs.CREDENTIALS in pacs.pacs_error(health, http_error(401)).detail
    assert "answered 503" in pacs.pacs_error(health, http_error(503)).detail
    assert pacs.pacs_error(health, http_error(404)) is None  # about the request, not the PACS
    assert "did not answer within" in pacs.pacs_error(health, requests.ReadTimeout()).detail
    assert pacs.pacs_error(health, ValueError("x")) is None
    health.ok()
    assert health.down is None


def _proxy(method: str, path: str, query: bytes = b""):
    import asyncio

    from lib.monailabel_adapter.dicomweb_proxy import proxy_dicom
    from starlette.requests import Request

    request = Request({"type": "http", "method": method, "path": f"/proxy/dicom/{path}", "query_string": query,
                       "headers": []})
    return asyncio.run(proxy_dicom(request, "", path))


def test_the_proxy_answers_for_itself_before_any_pacs_request(monkeypatch):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", "/data/studies")
    r = _proxy("GET", "studies")
    assert r.status_code == 404 and b"local folder" in r.body
    url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", url)
    r = _proxy("POST", "../../tools/shutdown")
    assert r.status_code == 400 and b"'..'" in r.body
    r = _proxy("GET", "studies", b"includefield=00081030%2C00080060")
    assert r.status_code == 503 and url.encode() in r.body and int(r.headers["retry-after"]) > 0
