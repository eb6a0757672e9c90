"""OHIF at /viewer/ with MONAI_LABEL_AUTH_ENABLE: an OpenID Connect login in Debian's chromium (Playwright).

Three real processes on 127.0.0.1: an OIDC provider (PyPI ``oidc-provider-mock``, with PKCE required:
``mrannotator.testing.oidc_provider``), Orthanc with an MR study, and the MONAI Label server with auth on,
whose realm is the provider. Chromium opens /viewer/, OHIF sends it to the provider's login page (authorization
code + PKCE S256), the annotator types her name into the form and clicks Authorize (real mouse and keyboard
events), OHIF exchanges the code with its verifier and shows the study list, which it read through the
server's DICOMweb proxy with her bearer token. The provider's access tokens are opaque: the server checks them
at the provider's userinfo endpoint (MRANNOTATOR_AUTH_USERINFO) and reads the roles from the ``roles`` claim
the provider puts there (MONAI_LABEL_AUTH_TOKEN_ROLES=roles). With the token the browser holds: the proxy and
MONAI Label routes answer, a label is saved (a SEG reaches Orthanc), a DELETE is refused 403; no token or a bad
one gets 401. Screenshots: build/test-artifacts/ohif-oidc/ (or $MRANNOTATOR_TEST_ARTIFACTS/ohif-oidc).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import nibabel as nib
import numpy as np
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing import browser as browser_support
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import read_series, write_series
from mrannotator.testing.server_support import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MRANNOTATOR_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "ohif-oidc"
CLIENT_ID = "mrannotator-ohif"
ANNOTATOR = {"sub": "anna", "preferred_username": "anna", "name": "Anna Annotator",
             "roles": ["monailabel-annotator"]}
PATIENT = "MRAOIDC"


def _why_skip() -> str | None:
    return browser_support.why_skip("oidc_provider_mock")


pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_weights):
    from mrannotator.testing.oidc_provider import running_provider

    root = tmp_path_factory.mktemp("ohif_oidc")
    ph = make_phantom("abdomen", seed=8500, orientation="LPS")
    write_series(ph.image, root / "mr", series_description="T2 abdomen LPS", study_description="MR abdomen OIDC",
                 patient_id=PATIENT)
    datasets, volume = read_series(root / "mr")
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ph.image.affine), nib.io_orientation(volume.affine))
    labels = nib.orientations.apply_orientation(np.asanyarray(ph.labels.dataobj).astype(np.uint8), ornt)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels), volume.affine), root / "label.nii.gz")
    provider_port = free_port()
    realm = f"http://127.0.0.1:{provider_port}"
    auth = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm,
            "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID, "MONAI_LABEL_AUTH_TOKEN_ROLES": "roles",
            "MRANNOTATOR_AUTH_USERINFO": "true"}
    with orthanc_support.running_orthanc(root / "orthanc") as pacs:
        orthanc_support.store_files(pacs, sorted((root / "mr").iterdir()))
        (root / "server").mkdir()
        with orthanc_support.running_monailabel(pacs.dicomweb_url, root / "server", demo_weights,
                                                env={**pacs.env(), **auth}) as server:
            # the provider lets only the server's origin (where OHIF runs) read its answers (CORS)
            with running_provider(root / "provider.log", [ANNOTATOR], server["url"], port=provider_port) as idp:
                yield {"server": server, "pacs": pacs, "idp": idp, "series": str(datasets[0].SeriesInstanceUID),
                       "label": root / "label.nii.gz"}


def _click(page, locator) -> None:
    box = locator.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def _log_in_through_the_provider(page, setup) -> dict:
    """Open the viewer, be sent to the provider, log in as the annotator, open the study; the requests made."""
    seen: list = []
    page.on("request", lambda request: seen.append(request))
    page.on("console", lambda m: m.type == "error" and print(f"browser: {m.text[:200]} ({m.location.get('url')})"))
    url, idp = setup["server"]["url"], setup["idp"].url
    page.goto(f"{url}/viewer/")
    page.wait_for_url(f"{idp}/oauth2/authorize?**", timeout=60_000)
    authorize = parse_qs(urlparse(page.url).query)
    field = page.locator("input[name=sub]")
    field.wait_for(timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "1_provider_login.png"))
    _click(page, field)
    page.keyboard.type(ANNOTATOR["sub"], delay=30)
    page.screenshot(path=str(ARTIFACTS / "2_login_filled.png"))
    _click(page, page.get_by_role("button", name="Authorize"))
    row = page.locator("tr").filter(has=page.get_by_text("MR abdomen OIDC", exact=True))
    try:
        row.first.wait_for(timeout=90_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "failed_after_login.png"))
        raise
    page.screenshot(path=str(ARTIFACTS / "3_study_list_after_login.png"))
    listed = time.monotonic()
    final_url = page.url
    _click(page, row.first)  # open the study: series metadata and pixel data through the proxy (WADO-RS)
    _click(page, page.get_by_role("button", name="Segmentation", exact=True))
    page.locator("[data-cy=viewport-pane] canvas").first.wait_for(timeout=90_000)
    page.wait_for_function("() => !document.querySelector('[data-cy=viewport-pane] .loading-indicator')",
                           timeout=90_000)
    time.sleep(3)  # the volume finishes loading
    page.screenshot(path=str(ARTIFACTS / "4_study_open.png"))
    token_posts = [r for r in seen if r.url.startswith(f"{idp}/oauth2/token") and r.method == "POST"]
    proxy = [r for r in seen if r.url.startswith(f"{url}/proxy/dicom/")]
    return {"authorize": authorize, "token_posts": token_posts, "proxy": proxy, "final_url": final_url,
            "listed": listed}


def test_annotator_logs_in_to_ohif_through_the_oidc_provider_and_her_token_carries_her_role(setup):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = setup["server"]["url"]
    started = time.monotonic()
    with browser_support.open_page() as page:
        seen = _log_in_through_the_provider(page, setup)
    print(f"browser: viewer -> provider login -> study list {seen['listed'] - started:.1f} s, "
          f"study open {time.monotonic() - seen['listed']:.1f} s more")
    # authorization code + PKCE: S256 challenge out, the verifier with the code exchange
    assert seen["authorize"]["response_type"] == ["code"] and seen["authorize"]["client_id"] == [CLIENT_ID]
    assert seen["authorize"]["code_challenge_method"] == ["S256"] and seen["authorize"]["code_challenge"]
    assert seen["authorize"]["redirect_uri"] == [f"{url}/viewer/callback"]
    assert len(seen["token_posts"]) >= 1
    exchange = parse_qs(seen["token_posts"][0].post_data or "")
    assert exchange["grant_type"] == ["authorization_code"] and exchange.get("code_verifier")
    assert seen["final_url"].startswith(f"{url}/viewer") and "code=" not in seen["final_url"]
    # every request OHIF sent to the proxy carried the bearer token
    assert seen["proxy"], "OHIF sent nothing to the DICOMweb proxy"
    headers = [r.headers.get("authorization", "") for r in seen["proxy"]]
    assert all(h.startswith("Bearer ") for h in headers), headers
    token = headers[0].removeprefix("Bearer ")
    assert {h.removeprefix("Bearer ") for h in headers} == {token}
    kinds = sorted({r.url.split("/proxy/dicom/")[1].split("/")[0] for r in seen["proxy"]})
    wado = [r for r in seen["proxy"] if "/wado/" in r.url]
    assert any("/series" in r.url and "metadata" in r.url for r in wado), [r.url for r in wado]
    print(f"{len(seen['proxy'])} proxy requests ({', '.join(kinds)}; {len(wado)} WADO), all with the bearer token "
          f"(opaque, {len(token)} characters)")
    _the_token_works_as_an_annotators(setup, token)


def _the_token_works_as_an_annotators(setup, token: str) -> None:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    url, series = setup["server"]["url"], setup["series"]
    bearer = {"Authorization": f"Bearer {token}"}
    studies = f"{url}/proxy/dicom/qido/studies"
    forged = jwt.encode({"iss": setup["idp"].url, "aud": CLIENT_ID, "sub": "anna", "roles": ["monailabel-admin"],
                         "exp": int(time.time()) + 300, "typ": "Bearer"},
                        rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")
    refusals = {"no token": requests.get(studies, timeout=30),
                "opaque token the provider never issued": requests.get(
                    studies, headers={"Authorization": "Bearer x" + token[1:][::-1]}, timeout=30),
                "JWT signed by another key": requests.get(
                    studies, headers={"Authorization": f"Bearer {forged}"}, timeout=30)}
    assert {k: r.status_code for k, r in refusals.items()} == dict.fromkeys(refusals, 401), \
        {k: (r.status_code, r.text[:200]) for k, r in refusals.items()}
    assert "WWW-Authenticate" in refusals["no token"].headers
    r = requests.get(studies, headers=bearer, timeout=30)
    assert r.status_code == 200 and PATIENT in r.text, (r.status_code, r.text[:300])
    r = requests.get(f"{url}/info/", headers=bearer, timeout=30)  # a MONAI Label route
    assert r.status_code == 200, r.text
    # an annotator cannot delete
    r = requests.delete(f"{url}/datastore/?id={series}", headers=bearer, timeout=30)
    assert r.status_code == 403 and "monailabel-admin" in r.text, (r.status_code, r.text)
    # an annotator saves a label: MONAI Label's save_label, a SEG stored in the PACS
    before = set(orthanc_support.seg_series(setup["pacs"], series))
    with open(setup["label"], "rb") as f:
        r = requests.put(f"{url}/datastore/label?image={series}&tag=final", headers=bearer,
                         files={"label": ("label.nii.gz", f)}, timeout=300)
    assert r.status_code == 200, r.text
    (saved,) = set(orthanc_support.seg_series(setup["pacs"], series)) - before
    _stow_a_copy(setup, saved, bearer)
    print("with the browser's token: QIDO 200, /info/ 200, save label 200 (SEG in the PACS), STOW of a SEG 200, "
          "DELETE 403; no token / unknown opaque token / forged JWT: 401")


def _stow_a_copy(setup, seg_series: str, bearer: dict) -> None:
    """What OHIF's "Export DICOM SEG" sends: a SEG in a STOW-RS POST to the proxy's WADO root, with the token."""
    import io

    import pydicom

    client = orthanc_support.dicomweb(setup["pacs"])
    study = client.search_for_series(search_filters={"SeriesInstanceUID": seg_series})[0]["0020000D"]["Value"][0]
    (seg,) = client.retrieve_series(study, seg_series)
    seg.SeriesInstanceUID, seg.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    out = io.BytesIO()
    seg.save_as(out, enforce_file_format=True)
    body = b"--mra\r\nContent-Type: application/dicom\r\n\r\n" + out.getvalue() + b"\r\n--mra--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=mra'}
    url = f"{setup['server']['url']}/proxy/dicom/wado/studies"
    assert requests.post(url, data=body, headers=headers, timeout=60).status_code == 401
    r = requests.post(url, data=body, headers={**headers, **bearer}, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert str(seg.SeriesInstanceUID) in orthanc_support.seg_series(setup["pacs"], setup["series"])


def test_the_provider_refuses_a_code_without_its_pkce_verifier(setup):
    """The login above proves PKCE only if the provider checks the verifier: a wrong or missing one is refused,
    and so is an authorization request without an S256 challenge."""
    import base64
    import hashlib
    import secrets

    idp, callback = setup["idp"].url, f"{setup['server']['url']}/viewer/callback"
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()

    def code(**pkce) -> dict:
        query = {"client_id": CLIENT_ID, "redirect_uri": callback, "response_type": "code", "scope": "openid",
                 "state": "s", **pkce}
        r = requests.post(f"{idp}/oauth2/authorize", params=query, data={"sub": ANNOTATOR["sub"]},
                          allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        return parse_qs(urlparse(r.headers["Location"]).query)

    def exchange(verifier_sent: str | None) -> requests.Response:
        form = {"grant_type": "authorization_code", "redirect_uri": callback, "client_id": CLIENT_ID,
                "code": code(code_challenge=challenge, code_challenge_method="S256")["code"][0]}
        if verifier_sent is not None:
            form["code_verifier"] = verifier_sent
        return requests.post(f"{idp}/oauth2/token", data=form, timeout=30)

    assert code()["error"] == ["invalid_request"]  # no challenge
    assert code(code_challenge=verifier, code_challenge_method="plain")["error"] == ["invalid_request"]
    wrong, missing, right = exchange(secrets.token_urlsafe(48)), exchange(None), exchange(verifier)
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant"), wrong.text
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request"), missing.text
    assert right.status_code == 200 and right.json()["access_token"], right.text
