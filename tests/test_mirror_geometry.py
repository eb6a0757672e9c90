"""Geometry matrix and mirrored labels on a real Orthanc and a real server (issue 19: saving, geometry).

One Orthanc and one server for the module. The PACS holds eight abdominal phantom series (axial,
sagittal, coronal, oblique; instance numbers increasing and decreasing along the slice normal; head
first and feet first) and the bundled real Siemens sagittal series. Tests run in file order:

1. a mirrored label (OHIF's export fault: frames reversed, positions right) never becomes final: with
   ``save_label`` it is refused (409, reason), as a SEG in the PACS it is quarantined (reason in the
   image's info, out of the trainer's dataset), both against the server's proposal and, for a series
   with no proposal, against the image;
2. a painted correction sent with ``save_label`` (stored as a SEG by the project's writer) comes back as
   the series' final label with 0 voxels different and its laterality kept, on every series.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from mrannotator.catalogue import load_catalogue
from mrannotator.testing import mirror_support as ms
from mrannotator.testing import orthanc_support

pytestmark = [pytest.mark.pacs, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
REAL_SERIES = ROOT.parent / "shared" / "data" / "real_dicom" / "siemens_t1_sag_hfs"
LISTING_WAIT_S = 3.5  # the server re-reads the PACS listing after 3 s
AFFECTED = "sagittal_inc_ffs"  # instance numbers increase along the normal: where OHIF's export mirrors
NO_PROPOSAL = "coronal_dec_ffs"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    study = pydicom.uid.generate_uid()
    out = {ms.case_name(*case): ms.write_matrix_series(root, *case, seed=9100 + n, series_number=n + 1,
                                                       study_uid=study)
           for n, case in enumerate(ms.MATRIX)}
    out["siemens"] = ms.real_series(REAL_SERIES)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, series):
    with orthanc_support.running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for entry in series.values():
            orthanc_support.store_files(server, sorted(entry["dir"].iterdir()))
        yield server


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("mirror_server")
    with orthanc_support.running_monailabel(pacs.dicomweb_url, root, demo_weights, env=pacs.env()) as srv:
        yield srv


def _put_label(server, image_uid, label: nib.Nifti1Image, tmp: Path) -> requests.Response:
    path = tmp / f"{image_uid}.nii.gz"
    nib.save(label, path)
    with open(path, "rb") as f:
        return requests.put(f"{server['url']}/datastore/label?image={image_uid}&tag=final",
                            files={"label": (path.name, f)}, timeout=300)


def _final(server, image_uid, tmp: Path) -> tuple[requests.Response, nib.Nifti1Image | None]:
    r = requests.get(f"{server['url']}/datastore/label?label={image_uid}&tag=final", timeout=300)
    if r.status_code != 200:
        return r, None
    path = tmp / f"{image_uid}-final.nii.gz"
    path.write_bytes(r.content)
    return r, nib.load(path)


def _info(server, image_uid) -> dict:
    return requests.get(f"{server['url']}/datastore/image/info?image={image_uid}", timeout=60).json()


def _correction(entry) -> nib.Nifti1Image:
    """A painted correction on the series grid: the spleen erased, a ball of kidney_left painted into the
    left kidney's place grown by one voxel layer (a left-only structure)."""
    from scipy import ndimage

    cat = load_catalogue()
    data = np.asanyarray(entry["labels"].dataobj).copy()
    data[data == cat.get("spleen").id] = 0
    left = cat.get("kidney_left").id
    data[ndimage.binary_dilation(data == left) & (data == 0)] = left
    return nib.Nifti1Image(data, entry["volume"].affine)


def _painted_blobs(entry) -> nib.Nifti1Image:
    """On the real head series: kidney_left painted on the patient's left, kidney_right on the right."""
    cat = load_catalogue()
    vol = entry["volume"]
    data = np.zeros(vol.shape, np.uint8)
    centre = np.array(vol.shape) // 2
    ras_x_of_k = nib.affines.apply_affine(vol.affine, [centre[0], centre[1], vol.shape[2] - 1])[0] - \
        nib.affines.apply_affine(vol.affine, [centre[0], centre[1], 0])[0]  # > 0: k runs to the right
    towards_left = -1 if ras_x_of_k > 0 else 1
    for name, side in (("kidney_left", towards_left), ("kidney_right", -towards_left)):
        c = centre.copy()
        c[2] += side * (vol.shape[2] // 4)
        data[ms._ball(vol.shape, c, 6)] = cat.get(name).id
    return nib.Nifti1Image(data, vol.affine)


def _segs_of(pacs, uid) -> set[str]:
    return set(orthanc_support.seg_series(pacs, uid))


# ------------------------------------------------------------------------------------- mirrored labels
def test_the_guard_keeps_proposals_and_quarantines_crash_safe(series, tmp_path):
    from lib.label_guard import LabelGuard, LabelMirrored

    entry = series[AFFECTED]
    truth, affine = np.asanyarray(entry["labels"].dataobj), entry["volume"].affine
    guard = LabelGuard(tmp_path)
    nib.save(entry["labels"], tmp_path / "result.nii.gz")
    guard.record_proposal("1.2.3", tmp_path / "result.nii.gz")
    assert [p.name for p in (tmp_path / "proposals").iterdir()] == ["1.2.3.nii.gz"]  # no temporary file left
    label = nib.Nifti1Image(np.ascontiguousarray(truth[:, :, ::-1]), affine)
    with pytest.raises(LabelMirrored) as refused:
        guard.refuse_if_mirrored("1.2.3", label, entry["volume"])
    assert refused.value.status_code == 409 and "mirrored along the slice axis" in refused.value.detail
    guard.refuse_if_mirrored("1.2.3", entry["labels"], entry["volume"])  # the honest one passes
    with pytest.raises(LabelMirrored, match="quarantined"):
        guard.screen_seg("1.2.3", "9.9.9", label, None)
    assert set(guard.quarantined()) == {"9.9.9"}
    assert guard.image_info("1.2.3")["label_quarantined"][0]["check"]["basis"] == "proposal"
    assert guard.image_info("4.5.6") == {}
    assert guard.proposal("1.2.3", affine * 2, truth.shape) is None  # a proposal on another grid is not used


def test_the_matrix_covers_both_slice_directions_both_positions_and_the_real_series(series):
    combos = {(e["direction"], e["position"]) for name, e in series.items() if name != "siemens"}
    assert combos == {(1, "HFS"), (1, "FFS"), (-1, "HFS"), (-1, "FFS")}
    for name, e in series.items():
        if name != "siemens":
            assert e["direction"] == (1 if "_inc_" in name else -1), name
    assert series["siemens"]["direction"] == -1 and series["siemens"]["position"] == "HFS"


def test_a_mirrored_label_is_refused_by_save_label_and_quarantined_as_a_seg(server, pacs, series, tmp_path):
    from lib.dicomweb_datastore import MRAnnotatorDICOMwebDatastore
    from lib.pacs import guarded_client

    entry = series[AFFECTED]
    uid = entry["uid"]
    server["client"].infer("mrannotator_abdomen", uid, {})  # the proposal the check compares with
    kept = next(server["cache"].glob(f"*/proposals/{uid}.nii.gz"))
    proposal = kept.read_bytes()
    # a refinement's answer (here a background click) is not the model's proposal: the kept one stays
    server["client"].infer("mrannotator_refine", uid, {"label": "liver", "foreground": [], "background": [[0, 0, 0]]})
    assert kept.read_bytes() == proposal
    before = _segs_of(pacs, uid)
    mirrored = nib.Nifti1Image(np.ascontiguousarray(np.asanyarray(_correction(entry).dataobj)[:, :, ::-1]),
                               entry["volume"].affine)
    r = _put_label(server, uid, mirrored, tmp_path)
    assert r.status_code == 409, r.text
    assert "mirrored along the slice axis" in r.json()["detail"] and "proposal" in r.json()["detail"]
    assert _segs_of(pacs, uid) == before  # nothing reached the PACS

    # OHIF's own export on this series: frames reversed, positions and references right
    orthanc_support.dicomweb(pacs).store_instances([ms.mirrored_seg(entry["datasets"], entry["labels"])])
    time.sleep(LISTING_WAIT_S)
    r, _ = _final(server, uid, tmp_path)
    assert r.status_code == 409 and "quarantined" in r.text, r.text
    info = _info(server, uid)
    assert len(info["label_quarantined"]) == 1 and "mirrored" in info["label_quarantined"][0]["reason"]
    assert info["label_quarantined"][0]["check"]["basis"] == "proposal"
    assert "final" not in server["client"].datastore()["objects"][uid]["labels"]
    # the trainer's dataset (the datastore's datalist, as the train subprocess builds it) leaves it out
    client = guarded_client(pacs.dicomweb_url, pacs.username, pacs.password)
    store = MRAnnotatorDICOMwebDatastore(client, server["cache"], lambda: {s.id for s in load_catalogue()})
    assert uid not in store.get_labeled_images()
    assert all(uid not in d["image"] for d in store.datalist())


def test_a_mirrored_seg_on_a_series_without_a_proposal_is_caught_by_the_image(server, pacs, series, tmp_path):
    entry = series[NO_PROPOSAL]
    uid = entry["uid"]
    orthanc_support.dicomweb(pacs).store_instances([ms.mirrored_seg(entry["datasets"], entry["labels"])])
    time.sleep(LISTING_WAIT_S)
    r, _ = _final(server, uid, tmp_path)
    assert r.status_code == 409 and "quarantined" in r.text, r.text
    assert _info(server, uid)["label_quarantined"][0]["check"]["basis"] == "image"
    assert not list(server["cache"].glob(f"*/proposals/{uid}.nii.gz"))


# ------------------------------------------------------------------------------------- the geometry matrix
def test_a_painted_correction_comes_back_as_the_final_label_voxel_for_voxel_on_every_series(
        server, pacs, series, tmp_path):
    cat = load_catalogue()
    left, right = cat.get("kidney_left").id, cat.get("kidney_right").id
    for name, entry in series.items():
        correction = _painted_blobs(entry) if name == "siemens" else _correction(entry)
        r = _put_label(server, entry["uid"], correction, tmp_path)
        assert r.status_code == 200, (name, r.text)
    time.sleep(LISTING_WAIT_S)
    for name, entry in series.items():
        correction = _painted_blobs(entry) if name == "siemens" else _correction(entry)
        r, final = _final(server, entry["uid"], tmp_path)
        assert r.status_code == 200, (name, r.text)
        assert final.shape == correction.shape and np.allclose(final.affine, correction.affine, atol=1e-3), name
        differ = int(np.count_nonzero(np.asanyarray(final.dataobj) != np.asanyarray(correction.dataobj)))
        assert differ == 0, f"{name}: {differ} voxels differ"
        # laterality: the left kidney lies on the patient's left of the right one (RAS: smaller x)
        assert ms.ras_centroid(final, left)[0] < ms.ras_centroid(final, right)[0], name
        quarantined = _info(server, entry["uid"]).get("label_quarantined", [])
        assert len(quarantined) == (1 if name in (AFFECTED, NO_PROPOSAL) else 0), (name, quarantined)
