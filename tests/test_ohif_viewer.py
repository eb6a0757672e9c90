"""The current OHIF (npm ``@ohif/app`` 3.13.2) the server serves at /viewer/, in Debian's chromium (Playwright).

What an annotator does, with real mouse events only: the study list shows the MR study with its description
(QIDO through the server's proxy, includefield split); open it in the Segmentation mode; scroll to a slice;
add a segmentation, name its segment after a catalogue structure, paint it with the brush, erase part of it;
Export > DICOM SEG > Save (STOW through /proxy/dicom to Orthanc). The stored SEG is read back with the
project's reader (mrannotator.dicom.seg_read.labels_from_seg) and compared with the painted region on the image grid:
the brush and eraser discs mapped from the canvas to voxels through the body outline seen on the canvas.

The series is an LPS-stored phantom whose instance numbers increase along the slice normal: the series on
which OHIF 3.x's SEG export (the bundle MONAI Label 0.8.5 ships) writes its frames mirrored. The test prints
the voxel counts on the painted slice and on its mirror. Screenshots: build/test-artifacts/ohif-viewer/
(or $MRANNOTATOR_TEST_ARTIFACTS/ohif-viewer).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mrannotator.phantoms import make_phantom
from mrannotator.testing import browser as browser_support
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import write_series

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MRANNOTATOR_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "ohif-viewer"
BRUSH_MM = 25.0  # OHIF's default brush / eraser radius
STRUCTURE = "Liver"  # a catalogue name: the project's reader maps the segment by it


def _why_skip() -> str | None:
    return browser_support.why_skip()


pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("ohif_viewer")
    ph = make_phantom("abdomen", seed=8400, orientation="LPS")
    write_series(ph.image, root / "mr", series_description="T2 abdomen LPS", study_description="MR abdomen viewer",
                 patient_id="MRAVIEWER")
    datasets = [pydicom.dcmread(f) for f in sorted((root / "mr").iterdir())]
    with orthanc_support.running_orthanc(root / "orthanc") as pacs:
        orthanc_support.store_files(pacs, sorted((root / "mr").iterdir()))
        (root / "server").mkdir()
        with orthanc_support.running_monailabel(pacs.dicomweb_url, root / "server", demo_weights,
                                                env=pacs.env()) as server:
            yield {"server": server, "pacs": pacs, "datasets": datasets}


def _span(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last index along the other axis where the body covers over 5 % of the line."""
    covered = np.flatnonzero(mask.mean(axis=axis) > 0.05)
    return int(covered[0]), int(covered[-1])


def canvas_to_voxel(canvas_gray: np.ndarray, slice_pixels: np.ndarray):
    """(x, y) on the canvas -> (column, row) of the slice, from the body outline on both (axial, rows down)."""
    body = canvas_gray > 40
    x0, x1 = _span(body, 0)
    y0, y1 = _span(body, 1)
    tissue = slice_pixels > 0.1 * np.percentile(slice_pixels, 99)
    c0, c1 = _span(tissue, 0)
    r0, r1 = _span(tissue, 1)

    def to_voxel(x: float, y: float) -> tuple[float, float]:
        return c0 + (x - x0) * (c1 - c0) / (x1 - x0), r0 + (y - y0) * (r1 - r0) / (y1 - y0)

    return to_voxel


def discs(shape, centres, spacing_rc, radius_mm: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    out = np.zeros(shape, bool)
    for c, r in centres:
        out |= ((rows - r) * spacing_rc[0]) ** 2 + ((cols - c) * spacing_rc[1]) ** 2 <= radius_mm ** 2
    return out


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / name))


def _drag(page, points) -> None:
    page.mouse.move(*points[0])
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p)
    page.mouse.up()


def _open_segmentation_mode(page, url: str) -> None:
    page.goto(f"{url}/viewer/")
    row = page.locator("tr").filter(has=page.get_by_text("MRAVIEWER", exact=True))
    row.first.wait_for(timeout=60_000)
    assert row.first.get_by_text("MR abdomen viewer").is_visible()  # study description: includefield honoured
    _shot(page, "1_study_list.png")
    row.first.click()
    page.get_by_role("button", name="Segmentation", exact=True).click()
    page.locator("[data-cy=addSegmentation]").wait_for(timeout=90_000)
    page.locator("[data-cy=viewport-pane] canvas").first.wait_for(timeout=90_000)
    time.sleep(3)  # the volume finishes loading


def _shown_instance(page) -> int:
    text = page.locator("[data-cy=viewport-overlay-bottom-right]").inner_text()
    found = re.search(r"I:\s*(\d+)", text)
    assert found, f"no instance number in the viewport overlay: {text!r}"
    return int(found.group(1))


def _name_segment(page, name: str) -> None:
    page.locator("[data-cy=actionsMenuTrigger]").first.wait_for(timeout=10_000)
    time.sleep(1)  # the new segment's row settles (the panel re-renders it once)
    for attempt in range(3):  # a re-render may close the menu just opened: open it again
        page.locator("[data-cy=actionsMenuTrigger]").first.click()
        try:
            page.get_by_role("menuitem", name="Rename").click(timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    box = page.locator("[role=dialog] input")
    box.wait_for(timeout=10_000)
    box.fill(name)
    page.locator("[role=dialog]").get_by_role("button", name="Save").click()
    page.get_by_text(name, exact=True).first.wait_for(timeout=10_000)


def _store_seg(page) -> None:
    page.locator("[data-cy=segmentation-collapsed-more-btn-Labelmap]").click()
    page.get_by_role("menuitem", name="Export").hover()
    page.get_by_role("menuitem", name="DICOM SEG").click()
    dialog = page.locator("[role=dialog]")
    dialog.locator("input").last.fill("annotator correction")
    _shot(page, "4_store_dialog.png")
    with page.expect_response(lambda r: "/proxy/dicom" in r.url and r.request.method == "POST",
                              timeout=120_000) as stow:
        dialog.get_by_role("button", name="Save").click()
    assert stow.value.status == 200, stow.value.text()


def _paint_and_store(page, setup) -> dict:
    """Scroll, paint a stroke, erase its right end, store; returns what was drawn (canvas coordinates)."""
    from PIL import Image

    canvas = page.locator("[data-cy=viewport-pane] canvas").first
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(6):  # six slices along, away from the middle and both ends
        page.mouse.wheel(0, 120)
        time.sleep(0.3)
    time.sleep(1)
    canvas.screenshot(path=str(ARTIFACTS / "2_slice.png"))
    gray = np.asarray(Image.open(ARTIFACTS / "2_slice.png").convert("L")).astype(float)
    instance = _shown_instance(page)
    marks = [("scroll", time.monotonic())]
    page.locator("[data-cy=addSegmentation]").click()
    _name_segment(page, STRUCTURE)
    marks.append(("add and name the segment", time.monotonic()))
    page.locator("[data-cy=Brush-btn]").click()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    # 6 mouse positions 31 px apart (the 25 mm brush is ~70 px): discs overlap; each move is ~1 s of rendering
    stroke = [(x + w * (0.40 + 0.03 * i), y + h * 0.40) for i in range(6)]
    _drag(page, stroke)
    marks.append(("brush", time.monotonic()))
    page.locator("[data-cy=Eraser-btn]").click()
    eraser = [stroke[-1], (stroke[-1][0] + 1, stroke[-1][1] + 1)]
    _drag(page, eraser)
    marks.append(("eraser", time.monotonic()))
    time.sleep(1)
    _shot(page, "3_painted_and_erased.png")
    _store_seg(page)
    _shot(page, "5_stored.png")
    marks.append(("export and store", time.monotonic()))
    print("steps: " + ", ".join(f"{name} {t - marks[i - 1][1]:.0f} s" for i, (name, t) in enumerate(marks) if i))
    local = [(px - x, py - y) for px, py in stroke], [(px - x, py - y) for px, py in eraser]
    return {"instance": instance, "gray": gray, "stroke": local[0], "eraser": local[1]}


def _stored_labels(setup) -> np.ndarray:
    from mrannotator.dicom.seg_read import labels_from_seg

    pacs = setup["pacs"]
    series = str(setup["datasets"][0].SeriesInstanceUID)
    segs = orthanc_support.seg_series(pacs, series)
    assert len(segs) == 1, segs
    client = orthanc_support.dicomweb(pacs)
    study = str(setup["datasets"][0].StudyInstanceUID)
    (seg,) = client.retrieve_series(study, segs[0])
    seg.save_as(ARTIFACTS / "stored_seg.dcm")
    print(f"stored SEG: SOP class {seg.SOPClassUID} ({seg.SOPClassUID.name}), {seg.NumberOfFrames} frames, "
          f"segmentation type {seg.get('SegmentationType')}")
    image = labels_from_seg(seg, setup["datasets"])
    return np.asanyarray(image.dataobj).transpose(2, 1, 0)  # (slice in stack order, row, column)


def test_annotator_paints_erases_and_stores_a_seg_in_the_current_ohif(setup):
    from mrannotator.dicom import stack_geometry

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    started = time.monotonic()
    with browser_support.open_page() as page:
        _open_segmentation_mode(page, setup["server"]["url"])
        opened = time.monotonic()
        drawn = _paint_and_store(page, setup)
    print(f"browser part: {time.monotonic() - started:.0f} s (study list to segmentation mode {opened - started:.0f} s,"
          f" scroll / paint / erase / store {time.monotonic() - opened:.0f} s)")
    datasets = setup["datasets"]
    order, _ = stack_geometry(datasets)
    ordered = [datasets[i] for i in order]
    k = next(i for i, ds in enumerate(ordered) if int(ds.InstanceNumber) == drawn["instance"])
    n = len(ordered)
    to_voxel = canvas_to_voxel(drawn["gray"], ordered[k].pixel_array.astype(float))
    spacing = [float(v) for v in ordered[k].PixelSpacing]
    painted = discs(ordered[k].pixel_array.shape, [to_voxel(*pt) for pt in drawn["stroke"]], spacing, BRUSH_MM)
    expected = painted & ~discs(painted.shape, [to_voxel(*pt) for pt in drawn["eraser"]], spacing, BRUSH_MM)
    labels = _stored_labels(setup)
    stored = labels > 0
    per_slice = stored.sum(axis=(1, 2))
    on_slice, on_mirror = int(per_slice[k]), int(per_slice[n - 1 - k])
    dice = 2 * (stored[k] & expected).sum() / max(1, stored[k].sum() + expected.sum())
    dice_mirror = 2 * (stored[n - 1 - k] & expected).sum() / max(1, stored[n - 1 - k].sum() + expected.sum())
    print(f"painted on instance {drawn['instance']} = stack slice {k} of {n}: expected {int(expected.sum())} voxels "
          f"(brush {int(painted.sum())}, erased {int((painted & ~expected).sum())}); stored SEG: {int(stored.sum())}"
          f" voxels, {on_slice} on slice {k} (Dice {dice:.3f}), {on_mirror} on mirrored slice {n - 1 - k} "
          f"(Dice {dice_mirror:.3f}), slices with voxels {np.flatnonzero(per_slice).tolist()}")
    flipped = expected[:, ::-1]  # left-right swapped in the plane: what a sagittal-style mirror would give
    dice_flipped = 2 * (stored[k] & flipped).sum() / max(1, stored[k].sum() + flipped.sum())
    print(f"Dice with the expected region left-right swapped: {dice_flipped:.3f}")
    assert set(np.unique(labels).tolist()) == {0, 5}  # catalogue id of Liver, by the segment's name
    assert k != n - 1 - k and expected.sum() > 50 and (painted & ~expected).sum() > 10
    assert int(stored.sum()) == on_slice + on_mirror, "voxels on slices that were never painted"
    assert on_slice == int(stored.sum()), "OHIF 3.13.2 mirrored the SEG frames on this series"
    # 3.5 mm pixels, a 25 mm brush and a canvas-to-voxel map from the body outline: edges differ by a voxel
    assert dice > 0.7 and dice > dice_flipped + 0.3
    _server_takes_it_as_final(setup, labels)


def _server_takes_it_as_final(setup, labels: np.ndarray) -> None:
    """The server lists the series as labelled; its final label is the stored SEG, voxel for voxel."""
    import gzip

    import nibabel as nib
    import requests

    url, series = setup["server"]["url"], str(setup["datasets"][0].SeriesInstanceUID)
    time.sleep(3.5)  # the server re-reads the PACS listing after 3 s
    objects = requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]
    assert "final" in objects[series]["labels"], objects[series]
    r = requests.get(f"{url}/datastore/label?label={series}&tag=final", timeout=120)
    assert r.status_code == 200, r.text
    final = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj).transpose(2, 1, 0)
    print(f"server's final label: {int((final > 0).sum())} voxels, {int((final != labels).sum())} differ from the SEG")
    assert np.array_equal(final, labels)
