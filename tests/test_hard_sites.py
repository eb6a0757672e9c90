"""Hard sites: the anatomical variation and the acquisition shifts are what they say."""

import dataclasses

import numpy as np
import pytest

from mrannotator.catalogue import load_catalogue
from mrannotator.hard_sites import (
    HARD_SITES,
    MAX_ROTATION_DEG,
    MAX_SCALE,
    MAX_SHIFT_MM,
    REMOVABLE,
    Anatomy,
    draw_anatomy,
    make_hard_phantom,
    motion_ghosts,
)

pytestmark = pytest.mark.unit
CAT = load_catalogue()


def _mask(ph, organ):
    return np.asarray(ph.labels.dataobj) == CAT.get(organ).id


def _centroid_mm(ph, organ):
    idx = np.argwhere(_mask(ph, organ)).mean(0)
    return (ph.labels.affine @ [*idx, 1.0])[:3]


def _with(**changes):
    return dataclasses.replace(Anatomy.neutral(), **changes)


def test_drawn_anatomy_stays_in_its_ranges_and_varies():
    draws = [draw_anatomy(np.random.default_rng(s)) for s in range(200)]
    scales = np.array([v for a in draws for v in a.scale.values()])
    shifts = np.array([np.linalg.norm(v) for a in draws for v in a.shift.values()])
    rots = np.array([a.rotation_deg for a in draws])
    assert scales.min() >= 1 - MAX_SCALE and scales.max() <= 1 + MAX_SCALE and np.ptp(scales) > 0.35
    assert shifts.max() <= MAX_SHIFT_MM + 1e-9 and shifts.max() > 13
    assert np.abs(rots).max() <= MAX_ROTATION_DEG and np.ptp(rots) > 15
    missing = [m for a in draws for m in a.missing]
    assert set(missing) == set(REMOVABLE) and 0.05 < len(missing) / (200 * len(REMOVABLE)) < 0.3


def test_missing_organs_are_absent_and_the_rest_present():
    ph, _ = make_hard_phantom(1, "hard_t1", _with(missing=("spleen", "gallbladder")))
    assert not _mask(ph, "spleen").any() and not _mask(ph, "gallbladder").any()
    for organ in ("liver", "kidney_left", "kidney_right", "pancreas", "aorta", "inferior_vena_cava"):
        assert _mask(ph, organ).sum() > 20, organ
    assert "spleen" not in ph.structures.values()


@pytest.mark.parametrize("factor", [1 - MAX_SCALE, 1 + MAX_SCALE])
def test_organ_size_follows_its_scale(factor):
    base, _ = make_hard_phantom(1, "shifted_t2", Anatomy.neutral())
    neutral = Anatomy.neutral()
    scaled, _ = make_hard_phantom(1, "shifted_t2", _with(scale={**neutral.scale, "spleen": factor}))
    ratio = _mask(scaled, "spleen").sum() / _mask(base, "spleen").sum()
    assert ratio == pytest.approx(factor**3, rel=0.1)


def test_organ_position_and_patient_rotation():
    neutral = Anatomy.neutral()
    base, _ = make_hard_phantom(1, "shifted_t2", neutral)
    moved, _ = make_hard_phantom(1, "shifted_t2", _with(shift={**neutral.shift, "liver": (0.0, 15.0, 0.0)}))
    d = _centroid_mm(moved, "liver") - _centroid_mm(base, "liver")
    assert d[1] == pytest.approx(15.0, abs=2.0) and abs(d[0]) < 3.0  # (kidneys painted later clip the liver)
    rotated, _ = make_hard_phantom(1, "shifted_t2", _with(rotation_deg=10.0))
    a0, a1 = _centroid_mm(base, "aorta")[:2], _centroid_mm(rotated, "aorta")[:2]
    angle = np.degrees(np.arctan2(a1[1], a1[0]) - np.arctan2(a0[1], a0[0]))
    assert abs(abs(angle) - 10.0) < 2.0 and np.linalg.norm(a1) == pytest.approx(np.linalg.norm(a0), abs=1.5)


def test_acquisition_grids_and_determinism():
    hires, _ = make_hard_phantom(2, "hard_t2_hires", Anatomy.neutral())
    assert hires.image.shape == (256, 256, 40)
    assert np.allclose(hires.image.header.get_zooms(), (1.5, 1.5, 4.0))
    a, an_a = make_hard_phantom(5, "hard_t1")
    b, an_b = make_hard_phantom(5, "hard_t1")
    assert np.allclose(a.image.header.get_zooms(), HARD_SITES["hard_t1"].spacing) and an_a == an_b
    assert np.array_equal(np.asarray(a.image.dataobj), np.asarray(b.image.dataobj))
    assert not np.array_equal(np.asarray(make_hard_phantom(6, "hard_t1")[0].image.dataobj), np.asarray(a.image.dataobj))
    small, _ = make_hard_phantom(2, "hard_t2_smallfov", Anatomy.neutral())
    img = np.asarray(small.image.dataobj)
    # the small field of view cuts the body: its left edge (x = -105 mm, last i in LAS) lies mostly in the body
    assert np.median(img[-1]) > 150 and np.median(img[-1]) > 3 * np.median(np.asarray(hires.image.dataobj)[:, 0])
    with pytest.raises(ValueError, match="unknown hard site"):
        make_hard_phantom(0, "nowhere")


def test_motion_ghosts_only_along_the_phase_encode_axis():
    img = np.zeros((40, 40, 4), np.float32)
    img[15:25, 15:25] = 100.0
    out = motion_ghosts(img, 0.6, np.random.default_rng(0), axis=1)
    assert out[15:25, :10].mean() > 2.0  # ghosts outside the object along axis 1
    assert out[:10, :].max() < 1e-3 and out[30:, :].max() < 1e-3  # nothing along axis 0
    assert np.array_equal(motion_ghosts(img, 0.0, np.random.default_rng(0)), img)
