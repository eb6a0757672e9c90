"""The overlap rule of the engine and the preview overlay, checked on hand-made inputs with written-down answers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mrannotator.catalogue import load_catalogue
from mrannotator.engine import _claim
from mrannotator.preview import OVERLAY_ALPHA, write_preview

pytestmark = pytest.mark.unit


def test_overlap_rule_on_a_hand_made_3x3x3_case():
    """Model A (lower dataset id, merged first) and model B both label parts of a 3x3x3 volume. Rule (engine
    docstring): a voxel both claim goes to the higher own-class probability; on a tie the earlier model (lower
    dataset id) keeps it; a voxel one model claims keeps that model's label."""
    a = np.zeros((3, 3, 3), np.uint8)
    a_conf = np.zeros((3, 3, 3), np.float32)
    b = np.zeros((3, 3, 3), np.uint8)
    b_conf = np.zeros((3, 3, 3), np.float32)
    # slice 0: A only | B only | neither
    a[0, 0, :], a_conf[0, 0, :] = 5, 0.9
    b[0, 1, :], b_conf[0, 1, :] = 11, 0.7
    # slice 1: both claim; B higher at [1,0,:], A higher at [1,1,:], a tie at [1,2,:]
    a[1], b[1] = 5, 11
    a_conf[1] = [[0.6, 0.6, 0.6], [0.8, 0.8, 0.8], [0.7, 0.7, 0.7]]
    b_conf[1] = [[0.9, 0.9, 0.9], [0.5, 0.5, 0.5], [0.7, 0.7, 0.7]]
    # slice 2: A claims with a low probability, B has background there (background never takes a voxel)
    a[2, :, 0], a_conf[2, :, 0] = 5, 0.51
    b_conf[2, :, 0] = 0.99
    merged, best = a.copy(), a_conf.copy()
    overlaps = _claim(merged, best, b, b_conf)
    expected = np.array([
        [[5, 5, 5], [11, 11, 11], [0, 0, 0]],
        [[11, 11, 11], [5, 5, 5], [5, 5, 5]],
        [[5, 0, 0], [5, 0, 0], [5, 0, 0]],
    ], np.uint8)
    assert np.array_equal(merged, expected)
    assert overlaps == 9  # slice 1 only
    assert [best[1, 0, 0], best[1, 2, 0], best[0, 1, 0]] == pytest.approx([0.9, 0.7, 0.7], abs=1e-6)


def _blend_pixels(png: np.ndarray, colour, alpha: float) -> np.ndarray:
    """Pixels showing ``colour`` at ``alpha`` over black (the flat test image renders black)."""
    want = np.round(np.asarray(colour, float) * alpha)
    return np.all(np.abs(png[..., :3] - want) <= 2, axis=-1)


def test_preview_draws_each_label_in_its_colour_on_its_side(tmp_path):
    """A flat image with the right kidney at high x and the left kidney at low x (RAS affine): the axial
    panel (the left third of the picture) shows each in its catalogue colour at 45 % over the image, the right
    kidney on the viewer's left (radiological convention), the left kidney on the viewer's right."""
    cat = load_catalogue()
    right, left = cat.get("kidney_right"), cat.get("kidney_left")
    shape = (60, 60, 20)
    labels = np.zeros(shape, np.uint8)
    labels[40:55, 20:40, 5:15] = right.id  # high x = the patient's right in RAS
    labels[5:20, 20:40, 5:15] = left.id
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    image = nib.Nifti1Image(np.full(shape, 100, np.int16), affine)
    out = write_preview(image, nib.Nifti1Image(labels, affine), tmp_path / "p.png", [right, left])
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    axial = png[:, : png.shape[1] // 3]
    assert right.color != left.color
    for s, side in ((right, "left"), (left, "right")):
        hits = _blend_pixels(axial, s.color, OVERLAY_ALPHA)
        assert hits.sum() > 200, f"{s.name}: overlay colour not found in the axial panel"
        cols = np.nonzero(hits)[1]
        middle = axial.shape[1] / 2
        assert (cols < middle).all() if side == "left" else (cols > middle).all(), s.name
    # the legend's full-strength patches are not what passed: the overlay pixels are blended ones
    assert not _blend_pixels(axial, right.color, 1.0).any()
