"""OHIF, as served by the app at /ohif/, in a real browser (Debian's chromium driven by Playwright) on a real PACS.

The path a radiographer takes: the study list shows the MR study; open it in the MONAI Label mode;
the panel is already pointed at this server (any port); connect, run ``mrannotator``; the overlay
appears; export the segmentation as a DICOM SEG to the PACS (OHIF's own ``storeSegmentation``, STOW
through the server's /proxy/dicom); the server then lists the series as labelled, with the label in
catalogue ids. Screenshots go to ``build/test-artifacts/ohif/``.
"""

from __future__ import annotations

import gzip
import io
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing import browser as browser_support
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import read_series, write_series

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts" / "ohif"


def _why_skip() -> str | None:
    if not CHROMIUM.is_file():
        return f"Debian's chromium is not installed ({CHROMIUM}; apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; its own browser download is not needed)"
    return orthanc_support.missing()


if _why_skip():
    print(f"SKIP test_ohif_browser: {_why_skip()}")
pytestmark = [pytest.mark.timeout(900), pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


# OHIF 3.x (as bundled with MONAI Label 0.8.5) exports the SEG of a volume viewport with its frames'
# content reversed along the slices when the series' instance numbers increase along the slice normal
# (measured: LPS-stored phantom, IOP 1\\0\\0\\0\\1\\0, instances numbered feet to head); with instance numbers
# decreasing along the normal (LAS-stored phantom) the export is exact. The overlay is drawn right in both.
EXPORT_EXACT, EXPORT_REVERSED = "LAS", "LPS"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("ohif")
    studies = {}
    for n, orientation in enumerate((EXPORT_EXACT, EXPORT_REVERSED)):
        ph = make_phantom("abdomen", seed=8200 + n, orientation=orientation)
        write_series(ph.image, root / orientation, series_description=f"T2 abdomen {orientation}",
                     study_description=f"MR abdomen {orientation}", patient_id=f"MRA{orientation}")
        first = pydicom.dcmread(next((root / orientation).iterdir()))
        studies[orientation] = {"study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID)}
    ph = make_phantom("abdomen", seed=8300, orientation="LPS")
    write_series(ph.image, root / "ct", modality="CT", series_number=5, series_description="CT abdomen",
                 study_description="CT abdomen", patient_id="MRACT")
    with orthanc_support.running_orthanc(root / "orthanc") as pacs:
        for d in (EXPORT_EXACT, EXPORT_REVERSED, "ct"):
            orthanc_support.store_files(pacs, sorted((root / d).iterdir()))
        (root / "server").mkdir()
        with orthanc_support.running_monailabel(pacs.dicomweb_url, root / "server", demo_weights,
                                                env=pacs.env()) as server:
            yield {"server": server, "pacs": pacs, "studies": studies, "root": root}


def _viewport_pixels(page, name: str) -> np.ndarray:
    from PIL import Image

    png = page.locator('[data-viewport-uid="mpr-axial"]').screenshot(path=str(ARTIFACTS / name))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _connect_and_run(page, server) -> None:
    url_box = page.locator("#monailabelServerURL")
    url_box.wait_for(timeout=90_000)
    assert url_box.input_value() == f"{server['url']}/"  # the panel points at the server it came from
    url_box.locator("xpath=../..").locator("button.actionButton").click()
    page.get_by_role("button", name="Run").first.wait_for(timeout=60_000)
    assert page.locator("select.selectBox").first.input_value() == "mrannotator"
    with page.expect_response(lambda r: "/infer/mrannotator?" in r.url, timeout=600_000) as infer:
        page.get_by_role("button", name="Run").first.click()
    assert infer.value.status == 200
    time.sleep(6)  # the label map is parsed and drawn


def _export_seg(page) -> None:
    """OHIF's own store action (the MONAI Label mode's layout has no segmentation panel with its menu entry)."""
    page.evaluate("""() => {
        const seg = window.services.segmentationService.getSegmentations()[0];
        const source = window.extensionManager.getActiveDataSource()[0];
        window.commandsManager.runCommand('storeSegmentation',
                                          {segmentationId: seg.segmentationId, dataSource: source});
    }""")
    dialog = page.get_by_text("Create Report").locator("xpath=ancestor::div[3]")
    dialog.locator("input[type=text]").fill("annotator correction")
    with page.expect_response(lambda r: "/proxy/dicom" in r.url and r.request.method == "POST",
                              timeout=120_000) as stow:
        page.locator("[data-cy=Save-btn]").click()
    assert stow.value.status == 200, stow.value.text()


def _label_and_prediction(setup, series: str, before: list[str], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """After an export: the one new SEG, the server's label from it and the model's prediction."""
    server, pacs = setup["server"], setup["pacs"]
    new = set(orthanc_support.seg_series(pacs, series)) - set(before)
    assert len(new) == 1
    time.sleep(3.5)  # the server re-reads the PACS listing after 3 s
    objects = requests.get(f"{server['url']}/datastore/?output=all", timeout=60).json()["objects"]
    assert "final" in objects[series]["labels"]
    r = requests.get(f"{server['url']}/datastore/label?label={series}&tag=final", timeout=300)
    assert r.status_code == 200, r.text
    exported = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
    path, _ = server["client"].infer("mrannotator", series, {})
    predicted = np.asanyarray(nib.load(path).dataobj)
    differ = exported != predicted
    print(f"{tag}: exported structures {sorted(set(np.unique(exported).tolist()) - {0})}; "
          f"voxels differing from the prediction {int(differ.sum())}, with the slices reversed "
          f"{int((exported[:, :, ::-1] != predicted).sum())} (of {differ.size})")
    assert set(np.unique(exported).tolist()) - {0}  # catalogue ids, not segment numbers 1..44
    return exported, predicted


def _open_in_monai_label_mode(page, server: dict, patient: str, check_list=None) -> None:
    """OHIF's study list (QIDO through the server's proxy) shows the patient's study; open it in the MONAI Label
    mode and wait for the MR volume. ``check_list(row)`` runs on the study list first."""
    page.goto(f"{server['url']}/ohif/")
    row = page.locator("tr").filter(has=page.get_by_role("cell", name=patient, exact=True))
    row.first.wait_for(timeout=60_000)
    if check_list:
        check_list(row)
    page.get_by_text("Confirm and Hide").click()
    row.first.click()
    page.get_by_role("button", name="MONAI Label").click()
    page.locator('[data-viewport-uid="mpr-axial"] canvas').wait_for(timeout=90_000)
    time.sleep(8)  # let the MR volume finish loading and rendering


def test_ohif_infer_overlay_and_seg_export_to_the_pacs_label_the_series(setup):
    server, pacs = setup["server"], setup["pacs"]
    series = setup["studies"][EXPORT_EXACT]["series"]
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    before = orthanc_support.seg_series(pacs, series)
    with browser_support.open_page() as page:
        # 1. the study list (QIDO through the server's proxy) shows the MR study; 2. open it in MONAI Label mode
        def study_list_shows_mr(row):
            page.screenshot(path=str(ARTIFACTS / "1_study_list.png"))
            assert row.first.filter(has=page.get_by_role("cell", name="MR", exact=True)).is_visible()

        _open_in_monai_label_mode(page, server, f"MRA{EXPORT_EXACT}", study_list_shows_mr)
        plain = _viewport_pixels(page, "2_mr_no_overlay.png")
        # 3. connect the panel (already pointed at this server) and run mrannotator: the overlay appears
        _connect_and_run(page, server)
        overlay = _viewport_pixels(page, "3_mr_with_overlay.png")
        page.screenshot(path=str(ARTIFACTS / "3_viewer_with_overlay.png"))
        changed = np.abs(overlay - plain).max(axis=2) > 30
        print(f"viewport pixels changed by the overlay: {changed.mean():.1%}")
        assert plain.shape == overlay.shape and changed.mean() > 0.01
        # 4. export the segmentation as DICOM SEG to the PACS
        _export_seg(page)
        page.screenshot(path=str(ARTIFACTS / "4_after_export.png"))
    # 5. the server lists the series as labelled; the label is the model's result in catalogue ids
    exported, predicted = _label_and_prediction(setup, series, before, EXPORT_EXACT)
    assert np.array_equal(exported, predicted)  # nothing was edited: the export is the model's result


def test_ohif_seg_export_reverses_the_slices_of_a_series_numbered_along_its_normal_upstream_bug(setup):
    """Measured upstream defect (see EXPORT_REVERSED): fails once OHIF exports this series exactly. The server
    does not take the reversed export as final: quarantined, the reason in the 409 and the image's info."""
    from mrannotator.dicom import labels_from_seg

    server, pacs = setup["server"], setup["pacs"]
    ids = setup["studies"][EXPORT_REVERSED]
    before = orthanc_support.seg_series(pacs, ids["series"])
    with browser_support.open_page() as page:
        _open_in_monai_label_mode(page, server, f"MRA{EXPORT_REVERSED}")
        _connect_and_run(page, server)
        page.screenshot(path=str(ARTIFACTS / "5_numbered_along_normal_with_overlay.png"))
        _export_seg(page)
    new = set(orthanc_support.seg_series(pacs, ids["series"])) - set(before)
    assert len(new) == 1
    time.sleep(3.5)  # the server re-reads the PACS listing after 3 s
    r = requests.get(f"{server['url']}/datastore/label?label={ids['series']}&tag=final", timeout=300)
    assert r.status_code == 409 and "mirrored along the slice axis" in r.text, r.text
    info = requests.get(f"{server['url']}/datastore/image/info?image={ids['series']}", timeout=60).json()
    assert [q["seg"] for q in info["label_quarantined"]] == list(new)
    # the SEG itself, read by reference as any reader would: the slices reversed
    client = orthanc_support.dicomweb(pacs)
    seg = client.retrieve_series(ids["study"], new.pop())[0]
    datasets, _ = read_series(setup["root"] / EXPORT_REVERSED)
    exported = np.asanyarray(labels_from_seg(seg, datasets).dataobj)
    path, _ = server["client"].infer("mrannotator", ids["series"], {})
    predicted = np.asanyarray(nib.load(path).dataobj)
    assert not np.array_equal(exported, predicted), "OHIF now exports this series exactly: drop this test"
    assert np.array_equal(exported[:, :, ::-1], predicted)
