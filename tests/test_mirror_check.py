"""The mirrored-label check (mrannotator.mirror) on phantoms (the app's guard: tests/test_mirror_geometry.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mrannotator.mirror import check_mirrored, intensity_fit, label_distance
from mrannotator.phantoms import make_phantom
from mrannotator.testing import mirror_support as ms

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for n, orientation in enumerate(("axial", "sagittal", "coronal", "oblique")):
        ph = make_phantom("abdomen", seed=19100 + n, orientation=orientation)
        out[orientation] = (np.asanyarray(ph.labels.dataobj).astype(np.uint8), np.asanyarray(ph.image.dataobj))
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
    truth, image = phantoms[orientation]
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
    truth, image = phantoms["axial"]
    empty = np.zeros_like(truth)
    assert check_mirrored(truth[:, :, ::-1], empty).mirrored is None  # an empty proposal tells nothing
    assert check_mirrored(truth[:, :, ::-1]).basis == "none"
    symmetric = truth | truth[:, :, ::-1]
    assert check_mirrored(symmetric, symmetric[:, :, ::-1]).mirrored is None
    assert intensity_fit(image, empty) == 0.0
    with pytest.raises(ValueError, match="not on one grid"):
        check_mirrored(truth, truth[:, :, :-1])

