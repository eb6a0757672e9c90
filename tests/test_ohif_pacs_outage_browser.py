"""What the annotator sees in OHIF (3.13.2 at /viewer/, Debian's chromium via Playwright) when the PACS is down.

Real Orthanc (stopped and started on the same port and storage) and one real server, never restarted:
(1) the server starts while Orthanc is down and serves OHIF; (2) Orthanc starts: the study list fills (with
the study description) without a server restart, the annotator opens a series; (3) Orthanc stops mid-session:
the annotator's next actions (export the segmentation as DICOM SEG to the PACS, open another series, back to
the study list, a link to another study) are answered within 5 s with a message on screen, also when Orthanc
hangs (SIGSTOP: accepts, never answers); (4) Orthanc back: the same actions work again. Mouse and keyboard
only. The answer times are measured twice: in the test (action -> message on screen) and by the browser (each
/proxy/dicom request's own timing). Screenshots: build/test-artifacts/ohif-pacs-outage/
(or $MRANNOTATOR_TEST_ARTIFACTS/ohif-pacs-outage).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pydicom
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing import browser as browser_support
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import write_series
from mrannotator.testing.server_support import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MRANNOTATOR_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "ohif-pacs-outage"
STUDY = "1.2.826.0.1.3680043.8.498.19"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.20"
PATIENT = "MRAOUTAGE"
DESCRIPTION = "MR abdomen outage"
ANSWER_WITHIN_S = 5.0
TIMES: dict[str, float] = {}


def _why_skip() -> str | None:
    return browser_support.why_skip()


pytestmark = [pytest.mark.browser, pytest.mark.timeout(900),
              pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding one MR study of two series, then stopped: the server starts without its PACS."""
    root = tmp_path_factory.mktemp("ohif_outage_dicom")
    uids = []
    for n in range(3):
        files = write_series(make_phantom("abdomen", seed=8600 + n, orientation="LPS").image, root / f"mr{n}",
                             study_instance_uid=STUDY, series_number=n + 1, series_description=f"T2 outage {n}",
                             study_description=DESCRIPTION, patient_id=PATIENT)
        uids.append(str(pydicom.dcmread(files[0]).SeriesInstanceUID))
    other = write_series(make_phantom("abdomen", seed=8610, orientation="LPS").image, root / "other",
                         study_instance_uid=OTHER_STUDY, series_description="T2 other study",
                         study_description="MR abdomen other", patient_id=f"{PATIENT}2")
    server = orthanc_support.RestartableOrthanc(tmp_path_factory.mktemp("ohif_outage_orthanc"))
    orthanc_support.store_files(server, sorted(p for d in root.iterdir() for p in d.iterdir()))
    server.stop()
    server.series = uids
    server.other_series = str(pydicom.dcmread(other[0]).SeriesInstanceUID)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("ohif_outage_server")
    env = {**pacs.env(), "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")}
    srv = start_server(root, pacs.dicomweb_url, demo_weights, env=env,
                       ready=lambda s: requests.get(f"{s.url}/info/", timeout=5).status_code == 200)
    yield srv
    stop_server(srv)
    print("\nanswer times (s):", {k: round(v, 2) for k, v in TIMES.items()})


class Proxy:
    """Every /proxy/dicom request the browser made: (method, path, status, its own duration in s)."""

    def __init__(self, page):
        self.seen: list[tuple[str, str, int, float]] = []
        page.on("requestfinished", self._finished)
        page.on("requestfailed", lambda r: self._record(r, 0))

    def _finished(self, request):
        response = request.response()
        self._record(request, response.status if response else 0)

    def _record(self, request, status: int):
        if "/proxy/dicom" not in request.url:
            return
        timing = request.timing
        took = (timing["responseEnd"] / 1000) if timing and timing.get("responseEnd", -1) >= 0 else -1.0
        path = request.url.split("/proxy/dicom", 1)[1]
        self.seen.append((request.method, path, status, took))

    def mark(self) -> int:
        return len(self.seen)

    def since(self, mark: int) -> list[tuple[str, str, int, float]]:
        return self.seen[mark:]


@pytest.fixture(scope="module")
def browser_page(server):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with browser_support.open_page() as page:
        yield page, Proxy(page)


def _shot(page, name: str) -> None:
    time.sleep(0.7)  # dialogs and notifications fade in (times are taken before this)
    page.screenshot(path=str(ARTIFACTS / name))


def _click(page, locator) -> None:
    """A real mouse click at the element's centre, once it is visible, stable and not covered (Playwright's
    actionability checks: a dialog still sliding in is not clicked beside its input)."""
    locator.first.click(timeout=60_000)


def _drag(page, points) -> None:
    page.mouse.move(*points[0])
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p)
    page.mouse.up()


def _wait_shown(page, text: str | re.Pattern, timeout_s: float) -> float:
    """Seconds until ``text`` is visible on the page (fails after ``timeout_s``)."""
    t0 = time.monotonic()
    page.get_by_text(text).first.wait_for(state="visible", timeout=timeout_s * 1000)
    return time.monotonic() - t0


def _connection_error_names_the_pacs(page, pacs) -> None:
    dialog = page.locator("[role=dialog]").filter(has=page.get_by_text("Data Source Connection Error"))
    assert pacs.dicomweb_url.rstrip("/") in dialog.inner_text(), dialog.inner_text()


def _record(proxy, mark, step: str) -> list[tuple[str, str, int, float]]:
    """The proxy requests of one step, summed up; the slowest one's browser-measured time kept in TIMES."""
    seen = proxy.since(mark)
    statuses = sorted({(m, s) for m, _, s, _ in seen})
    slowest = max((d for *_, d in seen), default=0.0)
    print(f"\n{step}: {len(seen)} proxy requests {statuses}, slowest {slowest:.3f} s")
    if seen:
        TIMES[f"{step}: slowest proxy request (browser)"] = slowest
    return seen


def _open_in_segmentation_mode(page) -> None:
    row = page.locator("tr").filter(has=page.get_by_text(PATIENT, exact=True))
    _click(page, row.first)
    _click(page, page.get_by_role("button", name="Segmentation", exact=True))
    page.locator("[data-cy=addSegmentation]").wait_for(timeout=90_000)
    page.locator("[data-cy=viewport-pane] canvas").first.wait_for(timeout=90_000)
    time.sleep(3)  # the volumes finish loading


def _paint(page) -> None:
    box = page.locator("[data-cy=viewport-pane] canvas").first.bounding_box()
    _click(page, page.locator("[data-cy=addSegmentation]"))
    page.get_by_text("Segment 1", exact=True).first.wait_for(timeout=10_000)
    _click(page, page.locator("[data-cy=Brush-btn]"))
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    _drag(page, [(x + w * (0.40 + 0.03 * i), y + h * 0.45) for i in range(4)])
    time.sleep(1)


def _export_seg(page, name: str) -> float:
    """Segmentation menu > Export > DICOM SEG > name > Save; returns the time of the Save click."""
    _click(page, page.locator("[data-cy=segmentation-collapsed-more-btn-Labelmap]"))
    page.get_by_role("menuitem", name="Export").hover()
    _click(page, page.get_by_role("menuitem", name="DICOM SEG"))
    dialog = page.locator("[role=dialog]").filter(has=page.get_by_role("button", name="Save"))
    try:
        # the menu hands the focus back to its trigger as it closes: type only once it is gone
        page.get_by_role("menuitem", name="DICOM SEG").wait_for(state="hidden", timeout=10_000)
        _click(page, dialog.locator("input").last)
        dialog.locator("input").last.fill(name)  # as the keyboard would, without racing OHIF's hotkeys
        saved = time.monotonic()
        _click(page, dialog.get_by_role("button", name="Save"))
    except Exception:
        _shot(page, f"failed_export_{name.replace(' ', '_')}.png")
        raise
    return saved


# ------------------------------------------------------------------------------------------------ the steps
def test_1_server_started_with_the_pacs_down_serves_ohif_which_names_the_pacs(server, pacs, browser_page):
    page, proxy = browser_page
    assert not pacs.running
    assert requests.get(f"{server.url}/info/", timeout=5).status_code == 200
    mark = proxy.mark()
    page.goto(f"{server.url}/viewer/")
    TIMES["page opened -> connection error shown (test)"] = _wait_shown(page, "Data Source Connection Error", 60)
    _shot(page, "1_pacs_down_at_start.png")
    seen = _record(proxy, mark, "start, PACS down")
    assert seen and all(s == 503 and d < ANSWER_WITHIN_S for m, p, s, d in seen), seen
    assert page.get_by_text("No studies available").is_visible()
    _connection_error_names_the_pacs(page, pacs)


def test_2_pacs_back_retry_fills_the_study_list_without_a_server_restart(server, pacs, browser_page):
    page, proxy = browser_page
    pid = server.proc.pid
    pacs.start()
    time.sleep(3.5)  # past the server's retry interval after the last failure (lib/pacs.py RETRY_AFTER_S)
    mark = proxy.mark()
    t0 = time.monotonic()
    _click(page, page.get_by_role("button", name="Retry"))
    row = page.locator("tr").filter(has=page.get_by_text(PATIENT, exact=True))
    row.first.wait_for(timeout=30_000)
    TIMES["Retry -> study list filled (test)"] = time.monotonic() - t0
    assert row.first.get_by_text(DESCRIPTION).is_visible()  # study description: includefield honoured
    _shot(page, "2_pacs_back_study_list.png")
    assert server.proc.poll() is None and server.proc.pid == pid
    _open_in_segmentation_mode(page)
    _paint(page)
    _shot(page, "3_study_open_and_painted.png")
    assert all(s == 200 for m, p, s, d in _record(proxy, mark, "PACS back, study opened"))


def test_3_pacs_stopped_mid_session_each_action_answers_within_5_s_with_a_message(server, pacs, browser_page):
    page, proxy = browser_page
    pacs.stop()
    # export the painted segmentation as DICOM SEG to the PACS (STOW through the proxy)
    mark = proxy.mark()
    saved = _export_seg(page, "outage correction")
    page.get_by_text("Create Report").first.wait_for(timeout=ANSWER_WITHIN_S * 1000)
    TIMES["export SEG: Save -> notification (test)"] = time.monotonic() - saved
    _shot(page, "4_pacs_down_export_seg.png")
    toast = page.locator("[data-sonner-toast]").filter(has=page.get_by_text("Create Report")).first.inner_text()
    print(f"export notification: {toast!r}")
    assert "successfully" not in toast
    stow = [r for r in _record(proxy, mark, "PACS down, export SEG") if r[0] == "POST"]
    assert stow and all(s == 503 and d < ANSWER_WITHIN_S for m, p, s, d in stow), stow
    # open the other series: OHIF loaded all three when the study opened, so it shows them from its own cache
    mark = proxy.mark()
    t0 = time.monotonic()
    page.locator("[data-cy=study-browser-thumbnail]").filter(has=page.get_by_text("T2 outage 2")).first.dblclick()
    page.locator("[data-cy=viewport-overlay-top-left]").filter(has=page.get_by_text("T2 outage 2")).first.wait_for(
        timeout=ANSWER_WITHIN_S * 1000)
    TIMES["open another series -> shown (test)"] = time.monotonic() - t0
    time.sleep(1)
    _shot(page, "5_pacs_down_other_series.png")
    assert all(d < ANSWER_WITHIN_S for *_, d in _record(proxy, mark, "PACS down, other series"))
    # back to the study list: the search fails and OHIF says so
    mark = proxy.mark()
    t0 = time.monotonic()
    _click(page, page.locator("[data-cy=return-to-work-list]"))
    _wait_shown(page, "Data Source Connection Error", ANSWER_WITHIN_S)
    TIMES["back to study list -> connection error (test)"] = time.monotonic() - t0
    _shot(page, "6_pacs_down_study_list.png")
    _connection_error_names_the_pacs(page, pacs)
    seen = _record(proxy, mark, "PACS down, study list")
    assert seen and all(s == 503 and d < ANSWER_WITHIN_S for m, p, s, d in seen), seen
    # a link to another study (from a worklist or a colleague's message), opened while the PACS is down
    mark = proxy.mark()
    t0 = time.monotonic()
    page.goto(f"{server.url}/viewer/segmentation?StudyInstanceUIDs={OTHER_STUDY}")  # returns once loaded
    TIMES["study link: OHIF page load (test)"] = time.monotonic() - t0
    TIMES["study link: loaded -> 'not available' (test)"] = _wait_shown(page, "not available at this time", 30)
    assert TIMES["study link: loaded -> 'not available' (test)"] < ANSWER_WITHIN_S
    _shot(page, "6c_pacs_down_study_link.png")
    seen = _record(proxy, mark, "PACS down, study link")
    assert seen and all(s == 503 and d < ANSWER_WITHIN_S for m, p, s, d in seen), seen
    # the page's own "study list" link: the connection error again (the state test_3b starts from)
    t0 = time.monotonic()
    _click(page, page.get_by_role("link", name="study list"))
    _wait_shown(page, "Data Source Connection Error", ANSWER_WITHIN_S)
    TIMES["'study list' link -> connection error (test)"] = time.monotonic() - t0
    assert server.proc.poll() is None


def test_3b_a_hanging_pacs_costs_the_annotator_at_most_the_timeout(server, pacs, browser_page):
    """Orthanc accepts connections but never answers (SIGSTOP): Retry on the study list."""
    page, proxy = browser_page
    pacs.start()
    time.sleep(3.5)  # past the server's retry interval: the next search goes to the PACS again
    os.kill(pacs.server.pid, signal.SIGSTOP)
    try:
        mark = proxy.mark()
        t0 = time.monotonic()
        with page.expect_response(lambda r: "/proxy/dicom/qido/studies" in r.url, timeout=30_000) as search:
            _click(page, page.get_by_role("button", name="Retry"))
        page.get_by_text("Data Source Connection Error").first.wait_for(timeout=ANSWER_WITHIN_S * 1000)
        TIMES["PACS hanging: Retry -> connection error (test)"] = time.monotonic() - t0
        _shot(page, "6b_pacs_hanging_study_list.png")
        assert search.value.status == 503 and "did not answer within" in search.value.text(), search.value.text()
        _connection_error_names_the_pacs(page, pacs)
        seen = _record(proxy, mark, "PACS hanging, study list")
        assert seen and all(s == 503 and d < ANSWER_WITHIN_S for m, p, s, d in seen), seen
    finally:
        os.kill(pacs.server.pid, signal.SIGCONT)
    assert TIMES["PACS hanging: Retry -> connection error (test)"] < ANSWER_WITHIN_S


def test_4_pacs_back_the_same_actions_work_again_without_a_restart(server, pacs, browser_page):
    page, proxy = browser_page
    pacs.start()
    assert not orthanc_support.seg_series(pacs.server)  # nothing was stored during the outage
    time.sleep(3.5)
    mark = proxy.mark()
    _click(page, page.get_by_role("button", name="Retry"))
    page.locator("tr").filter(has=page.get_by_text(PATIENT, exact=True)).first.wait_for(timeout=30_000)
    _open_in_segmentation_mode(page)
    _paint(page)
    with page.expect_response(lambda r: "/proxy/dicom" in r.url and r.request.method == "POST",
                              timeout=60_000) as stow:
        _export_seg(page, "after the outage")
    assert stow.value.status == 200, stow.value.text()
    page.get_by_text(re.compile("saved successfully|stored", re.I)).first.wait_for(timeout=30_000)
    _shot(page, "7_pacs_back_export_seg.png")
    assert all(s == 200 for m, p, s, d in _record(proxy, mark, "PACS back, export SEG"))
    assert len(orthanc_support.seg_series(pacs.server, pacs.series[0])) == 1
