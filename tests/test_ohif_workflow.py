"""The paper's annotation loop in the OHIF the server serves, with a login: log in, next study, run the model,
correct, save, and the correction trains the next model.

Real processes on 127.0.0.1: an OpenID Connect provider (PyPI ``oidc-provider-mock`` with PKCE required,
``mrannotator.testing.oidc_provider``), Orthanc with two MR series, and the MONAI Label server with auth on.
In Debian's chromium, with mouse and keyboard only: OHIF sends the annotator to the provider (authorization
code + PKCE), she types her name and clicks Authorize, opens the study in the **MRAnnotator** mode, clicks
Next study (the server's strategy opens a series), Run model, erases part of one structure and brushes
another in, Save label (``tests/test_ohif_annotate.py``'s ``annotate``: every request to the server carries
her bearer token). Then, with the test's own reading: the server's final label equals the label she sent,
voxel for voxel, and the SEG in the PACS has the catalogue's codes and laterality (``check_edits`` /
``check_final``). Her token cannot start a training (403: reviewer role); a reviewer's token, from the same
provider's code + PKCE flow, starts one: it trains on the saved correction and publishes a new model version,
which the next infer reports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest
import requests
from test_ohif_annotate import ARTIFACTS, annotate, check_edits, check_final
from test_ohif_oidc_browser import CLIENT_ID, _click, _why_skip

from mrannotator.phantoms import make_phantom
from mrannotator.testing import browser as browser_support
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import write_series
from mrannotator.testing.server_support import free_port

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900),
              pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]

ANNOTATOR = {"sub": "anna", "preferred_username": "anna", "name": "Anna Annotator", "roles": ["monailabel-annotator"]}
REVIEWER = {"sub": "rita", "preferred_username": "rita", "name": "Rita Reviewer", "roles": ["monailabel-reviewer"]}
STUDY = "MR abdomen workflow"
TRAIN = {"max_epochs": 1, "iterations": 2, "val_iterations": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_weights):
    from mrannotator.testing.oidc_provider import running_provider

    root = tmp_path_factory.mktemp("ohif_workflow")
    study = pydicom.uid.generate_uid()
    series = {}
    for n, orientation in enumerate(("LPS", "LAS")):
        ph = make_phantom("abdomen", seed=8700 + n, orientation=orientation)
        folder = root / f"mr{n}"
        write_series(ph.image, folder, series_description=f"T2 abdomen {orientation}", study_description=STUDY,
                     patient_id="MRAWORKFLOW", study_instance_uid=study, series_number=n + 1)
        datasets = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
        series[str(datasets[0].SeriesInstanceUID)] = {"dir": folder, "datasets": datasets, "study": study,
                                                      "uid": str(datasets[0].SeriesInstanceUID)}
    provider_port = free_port()
    auth = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": f"http://127.0.0.1:{provider_port}",
            "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID, "MONAI_LABEL_AUTH_TOKEN_ROLES": "roles",
            "MRANNOTATOR_AUTH_USERINFO": "true"}
    with orthanc_support.running_orthanc(root / "orthanc") as pacs:
        for entry in series.values():
            orthanc_support.store_files(pacs, sorted(entry["dir"].iterdir()))
        (root / "server").mkdir()
        with orthanc_support.running_monailabel(pacs.dicomweb_url, root / "server", demo_weights,
                                                env={**pacs.env(), **auth}, conf={"regions": "abdomen"}) as server:
            with running_provider(root / "provider.log", [ANNOTATOR, REVIEWER], server["url"],
                                  port=provider_port) as idp:
                yield {"server": server, "pacs": pacs, "idp": idp, "series": series}


def _log_in(page) -> None:
    field = page.locator("input[name=sub]")
    field.wait_for(timeout=10_000)
    _click(page, field)
    page.keyboard.type(ANNOTATOR["sub"], delay=30)
    _click(page, page.get_by_role("button", name="Authorize"))


def _log_in_and_annotate(page, setup) -> tuple[dict, dict, list]:
    """Login through the provider, MRAnnotator mode, Next study, annotate; (series entry, edits, requests)."""
    from test_ohif_annotate import _wait_viewport

    seen: list = []
    page.on("request", lambda request: seen.append(request))
    url = setup["server"]["url"]
    page.goto(f"{url}/viewer/")
    page.wait_for_url(f"{setup['idp'].url}/oauth2/authorize?**", timeout=60_000)
    _log_in(page)
    relogins = 0
    row = page.locator("tr").filter(has=page.get_by_text(STUDY, exact=True))
    row.first.wait_for(timeout=90_000)
    page.screenshot(path=str(ARTIFACTS / "workflow-1_study_list_after_login.png"))
    _click(page, row.first)
    _click(page, page.get_by_role("button", name="MRAnnotator", exact=True))
    _wait_viewport(page)
    with page.expect_response(lambda r: "/annotate/next/" in r.url, timeout=120_000) as handed:
        _click(page, page.locator("[data-cy=MRANextStudy-btn]"))
    assert handed.value.status == 200, handed.value.text()
    # Next study loads the series' page: OHIF 3.13 keeps its OIDC user in memory only, so that page load starts
    # a login again (with an identity provider that keeps a session, e.g. Keycloak, it returns at once; this
    # provider asks for the name each time)
    page.wait_for_url(lambda u: "SeriesInstanceUIDs=" in u, timeout=60_000)
    opened = page.locator("[data-cy=MRARunModel-btn]")
    deadline = time.monotonic() + 120
    while not (page.url.startswith(f"{setup['server']['url']}/viewer/") and opened.is_visible()):
        if page.url.startswith(setup["idp"].url) and page.locator("input[name=sub]").is_visible():
            relogins += 1
            _log_in(page)
        assert time.monotonic() < deadline, f"the series did not open after Next study: {page.url}"
        time.sleep(0.5)
    uid = parse_qs(urlparse(page.url).query)["SeriesInstanceUIDs"][0]
    assert uid in setup["series"], f"Next study opened {uid}, not a series of the PACS"
    try:
        _wait_viewport(page)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "workflow-failed_after_next_study.png"))
        print(f"after Next study: {page.url}")
        raise
    entry = setup["series"][uid]
    print(f"logins after Next study: {relogins}")
    return entry, annotate(page, entry, "workflow"), seen


def _reviewer_token(setup) -> str:
    """A reviewer's access token from the provider's authorization code + PKCE flow (as a script would)."""
    idp, callback = setup["idp"].url, f"{setup['server']['url']}/viewer/callback"
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {"client_id": CLIENT_ID, "redirect_uri": callback, "response_type": "code", "scope": "openid",
             "state": "s", "code_challenge": challenge, "code_challenge_method": "S256"}
    r = requests.post(f"{idp}/oauth2/authorize", params=query, data={"sub": REVIEWER["sub"]}, allow_redirects=False,
                      timeout=30)
    assert r.status_code == 302, r.text
    code = parse_qs(urlparse(r.headers["Location"]).query)["code"][0]
    r = requests.post(f"{idp}/oauth2/token", data={"grant_type": "authorization_code", "redirect_uri": callback,
                                                    "client_id": CLIENT_ID, "code": code, "code_verifier": verifier},
                      timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def _served_version(url: str, image: str, bearer: dict) -> str:
    from requests_toolbelt.multipart import decoder

    r = requests.post(f"{url}/infer/mrannotator", params={"image": image}, headers=bearer, timeout=300)
    assert r.status_code == 200, r.text
    parts = decoder.MultipartDecoder.from_response(r).parts
    return json.loads(next(p.text for p in parts if b"params" in p.headers[b"Content-Disposition"]))["model_version"]


def test_log_in_next_study_correct_save_and_the_correction_trains_the_next_model(setup):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = setup["server"]["url"]
    started = time.monotonic()
    with browser_support.open_page() as page:
        entry, done, seen = _log_in_and_annotate(page, setup)
    print(f"browser: login, next study, run model, correct, save in {time.monotonic() - started:.0f} s")
    to_server = [r for r in seen if r.url.startswith(f"{url}/annotate/") or r.url.startswith(f"{url}/proxy/")]
    headers = [r.headers.get("authorization", "") for r in to_server]
    assert to_server and all(h.startswith("Bearer ") for h in headers), headers  # one token per login
    annotator = {"Authorization": headers[-1]}  # the token that saved the label
    check_final(setup, entry, check_edits(entry, done), headers=annotator)

    before = _served_version(url, entry["uid"], annotator)
    r = requests.post(f"{url}/train/mrannotator", json=TRAIN, headers=annotator, timeout=60)
    assert r.status_code == 403 and "monailabel-reviewer" in r.text, (r.status_code, r.text)
    reviewer = {"Authorization": f"Bearer {_reviewer_token(setup)}"}
    r = requests.post(f"{url}/train/mrannotator", json=TRAIN, headers=reviewer, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while (task := requests.get(f"{url}/train/", headers=annotator, timeout=30).json())["status"] not in (
            "DONE", "ERROR", "STOPPED"):
        assert time.time() < deadline, task
        time.sleep(3)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = requests.get(f"{url}/info/", headers=annotator, timeout=30).json()["train_stats"]["mrannotator"]
    cases = stats["models"]["Dataset001_Abdomen"]["cases"]
    # the one label in the datastore: the browser's correction (a case is named after its cached image file)
    assert len(cases) == 1 and entry["uid"] in cases[0], cases
    after = _served_version(url, entry["uid"], annotator)
    assert after == stats["version"] != before, (before, after, stats["version"])
    print(f"training on {cases} published version {after} (served before: {before})")
