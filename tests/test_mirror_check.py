"""The mirrored-label check (mrannotator.mirror) and the app's guard (lib/label_guard.py), without a server."""

from __future__ import annotations

import sys
from pathlib import Path

import mirror_support as ms
import nibabel as nib
import numpy as np
import pytest

from mrannotator.mirror import check_mirrored, intensity_fit, label_distance
from mrannotator.phantoms import make_phantom

pytestmark = pytest.mark.unit
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "mrannotator"))


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for n, orientation in enumerate(("axial", "sagittal", "coronal", "oblique")):
        ph = make_phantom("abdomen", seed=19100 + n, orientation=orientation)
        out[orientation] = (np.asanyarray(ph.labels.dataobj).astype(np.uint8), np.asanyarray(ph.image.dataobj),
                            ph.image.affine)
    return out


def test_label_distance_counts_differing_labelled_voxels():
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    assert label_distance(a, b) == 0.0
    a[0, 0, :2] = 1
    b[0, 0, 1:3] = 1
    assert label_distance(a, b) == pytest.approx(2 / 3)
    b[0, 0, 1:3] = 2  # same place, other structure: differs
    assert label_distance(a, b) == 1.0


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_mirrored_labels_are_caught_honest_corrections_are_not(phantoms, orientation):
    truth, image, _ = phantoms[orientation]
    rng = np.random.default_rng(7)
    for kind in ms.EDITS:
        label = ms.honest_correction(truth, kind, rng, share=0.15)
        assert 0 < ms.edited_share(truth, label) <= 0.3
        assert check_mirrored(label, truth, image).mirrored is False, kind
        mirrored = check_mirrored(label[:, :, ::-1], truth, image)
        assert mirrored.mirrored is True and mirrored.basis == "proposal", kind
        assert check_mirrored(label, None, image).mirrored is None, kind  # the image alone never accuses it
    # the image alone catches a mirrored label that follows the anatomy (its rates: bench/mirror_check.py)
    assert check_mirrored(truth[:, :, ::-1], None, image).mirrored is True
    assert check_mirrored(truth[:, :, ::-1], None, image).basis == "image"


def test_nothing_is_decided_without_evidence(phantoms):
    truth, image, _ = phantoms["axial"]
    empty = np.zeros_like(truth)
    assert check_mirrored(truth[:, :, ::-1], empty).basis == "none"  # an empty proposal tells nothing
    symmetric = truth | truth[:, :, ::-1]
    assert check_mirrored(symmetric, symmetric[:, :, ::-1]).mirrored is None
    assert intensity_fit(image, empty) == 0.0
    with pytest.raises(ValueError, match="not on one grid"):
        check_mirrored(truth, truth[:, :, :-1])


def test_the_guard_keeps_proposals_and_quarantines_crash_safe(phantoms, tmp_path):
    from lib.label_guard import LabelGuard, LabelMirrored

    truth, image, affine = phantoms["sagittal"]
    guard = LabelGuard(tmp_path)
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "result.nii.gz")
    guard.record_proposal("1.2.3", tmp_path / "result.nii.gz")
    assert not [p for p in (tmp_path / "proposals").iterdir() if p.name != "1.2.3.nii.gz"]  # no temp left
    label = nib.Nifti1Image(np.ascontiguousarray(truth[:, :, ::-1]), affine)
    with pytest.raises(LabelMirrored) as refused:
        guard.refuse_if_mirrored("1.2.3", label, nib.Nifti1Image(image, affine))
    assert refused.value.status_code == 409 and "mirrored along the slice axis" in refused.value.detail
    guard.refuse_if_mirrored("1.2.3", nib.Nifti1Image(truth, affine), None)  # the honest one passes
    with pytest.raises(LabelMirrored, match="quarantined"):
        guard.screen_seg("1.2.3", "9.9.9", label, None)
    assert set(guard.quarantined()) == {"9.9.9"}
    assert guard.image_info("1.2.3")["label_quarantined"][0]["check"]["basis"] == "proposal"
    assert guard.image_info("4.5.6") == {}
    # a proposal on another grid is not used: the image decides, or nothing
    assert guard.proposal("1.2.3", affine * 2, truth.shape) is None
