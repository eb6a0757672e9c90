"""Click correction (mrannotator.refine) on a real demo-model segmentation of a phantom the model gets wrong."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mrannotator.catalogue import load_catalogue
from mrannotator.errors import InputError
from mrannotator.orientation import voxel_spacing
from mrannotator.probcache import ProbabilityCache, quantise
from mrannotator.refine import refine, refine_segmentation
from mrannotator.sites import make_site_phantom

pytestmark = pytest.mark.unit
CAT = load_catalogue()


@pytest.fixture(scope="module")
def case(segmenter):
    """A T1-contrast abdomen phantom: the demo model (trained on T2-like contrast) misses and confuses organs."""
    ph = make_site_phantom("abdomen", seed=31337, site="t1")
    seg = segmenter.segment(ph.image, regions=["abdomen"], probabilities=True)
    return ph, seg


def _arrays(case):
    ph, seg = case
    return (np.asarray(ph.image.dataobj), np.asarray(seg.labels.dataobj), np.asarray(ph.labels.dataobj),
            voxel_spacing(ph.image.affine))


def _deepest(mask, spacing):
    """The voxel deepest inside the largest connected part of ``mask`` (the click protocol's choice)."""
    lab, n = ndimage.label(mask)
    assert n, "no error region"
    comp = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    dt = ndimage.distance_transform_edt(np.pad(comp, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(np.argmax(dt), dt.shape))


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def _only_structure_moved(old, new, sid):
    changed = old != new
    assert np.all((old[changed] == sid) | (new[changed] == sid)), "a voxel moved between two other structures"


def test_foreground_click_adds_a_missed_region(case):
    image, labels, truth, sp = _arrays(case)
    sid = CAT.get("kidney_right").id
    missed = (truth == sid) & (labels != sid)
    assert missed.sum() > 0.8 * (truth == sid).sum(), "the model should miss most of this kidney on T1 contrast"
    click = _deepest(missed, sp)
    new = refine(image, labels, case[1].probabilities[sid], sid, foreground=[click], spacing=sp)
    before, after = _dice(labels == sid, truth == sid), _dice(new == sid, truth == sid)
    assert after > before + 0.5, (before, after)
    added = (new == sid) & (labels != sid)
    assert (added & (truth == sid)).sum() > 0.8 * added.sum(), "the click added mostly voxels outside the kidney"
    _only_structure_moved(labels, new, sid)
    assert labels.dtype == new.dtype and labels is not new


def test_background_click_removes_a_false_region(case):
    image, labels, truth, sp = _arrays(case)
    sid = CAT.get("spleen").id
    false = (labels == sid) & (truth != sid)
    assert false.sum() > 200, "the model should label a false spleen on T1 contrast"
    click = _deepest(false, sp)
    new = refine(image, labels, case[1].probabilities[sid], sid, background=[click], spacing=sp)
    still_false = (new == sid) & (truth != sid)
    assert still_false.sum() < 0.3 * false.sum(), (false.sum(), still_false.sum())
    assert new[click] != sid
    others = (labels != sid) & (labels != 0)
    assert np.array_equal(new[others], labels[others]), "a background click changed another structure"
    _only_structure_moved(labels, new, sid)


def test_scribbles_and_uint8_cache_maps_and_no_probability(case):
    image, labels, truth, sp = _arrays(case)
    sid = CAT.get("kidney_right").id
    scribbles = np.zeros(labels.shape, np.uint8)
    c = _deepest((truth == sid) & (labels != sid), sp)
    scribbles[c[0] - 1:c[0] + 2, c[1], c[2]] = 1
    cache = ProbabilityCache(max_bytes=10 * 2**20)
    assert cache.put("img", "v1", case[1].probabilities)
    stored = cache.get("img", "v1")[sid]
    assert stored.dtype == np.uint8 and cache.nbytes == len(case[1].probabilities) * labels.size
    new = refine(image, labels, stored, sid, scribbles=scribbles, spacing=sp)
    assert _dice(new == sid, truth == sid) > 0.5
    _only_structure_moved(labels, new, sid)
    # without any probability the current region is the prior: the click still adds its region
    new2 = refine(image, labels, None, sid, foreground=[c], spacing=sp)
    assert _dice(new2 == sid, truth == sid) > 0.5


def test_api_wrapper_on_a_segmentation(case):
    ph, seg = case
    truth = np.asarray(ph.labels.dataobj)
    sid = CAT.get("kidney_right").id
    click = _deepest((truth == sid) & (np.asarray(seg.labels.dataobj) != sid), voxel_spacing(ph.image.affine))
    out = refine_segmentation(seg, ph.image, "kidney_right", foreground=[click])
    assert "kidney_right" in [s.name for s in out.structures]
    assert out.labels.shape == seg.labels.shape and np.allclose(out.labels.affine, seg.labels.affine)
    with pytest.raises(InputError, match="unknown structure 'brain'"):
        refine_segmentation(seg, ph.image, "brain", foreground=[click])


def test_probability_cache_is_bounded_lru():
    maps = {1: np.full((10, 10, 10), 0.5, np.float32)}
    cache = ProbabilityCache(max_bytes=2500)
    assert cache.put("a", "v", maps) and cache.put("b", "v", maps)
    assert cache.get("a", "v") is not None  # a is now the most recent
    assert cache.put("c", "v", maps)
    assert cache.get("b", "v") is None and cache.get("a", "v") is not None and cache.nbytes == 2000
    assert not cache.put("big", "v", {1: np.zeros((20, 20, 20), np.float32)}) and cache.get("big", "v") is None
    assert quantise(maps[1])[0, 0, 0] == 128
    labels = np.ones((10, 10, 10), np.uint8)
    cache = ProbabilityCache(max_bytes=2200)
    assert cache.put("a", "v", maps, labels) and cache.nbytes == 2000
    cache.set_labels("a", "v", labels * 2)
    assert cache.labels("a", "v")[0, 0, 0] == 2 and cache.labels("a", "v2") is None
    assert cache.put("b", "v", maps) and cache.get("a", "v") is None and cache.labels("a", "v") is None
    cache.forget("b")
    assert len(cache) == 0 and cache.nbytes == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"foreground": [(999, 0, 0)]}, "outside the image"),
    ({"background": [(-1, 2, 3)]}, "outside the image"),
    ({"foreground": [(1, 2)]}, "not three voxel indices"),
    ({"foreground": [(1.5, 2, 3)]}, "whole voxel indices"),
    ({"foreground": [], "background": []}, "nothing to correct"),
    ({"foreground": [(1, 2, 3)], "label_id": 0}, "label id"),
    ({"foreground": [(1, 2, 3)], "label_id": "liver"}, "label id"),
    ({"foreground": [(1, 2, 3)], "probability": np.zeros((2, 2, 2), np.float32)}, "probability shape"),
    ({"scribbles": np.full((4, 5, 6), 3, np.uint8)}, "scribbles must be"),
])
def test_bad_input_is_an_input_error(kwargs, message):
    image = np.zeros((4, 5, 6), np.int16)
    labels = np.zeros((4, 5, 6), np.uint8)
    args = {"label_id": 1, "probability": None, **kwargs}
    with pytest.raises(InputError, match=message):
        refine(image, labels, **args)
    with pytest.raises(InputError, match="label map shape"):
        refine(image, labels[:2], None, 1, foreground=[(0, 0, 0)])


def test_a_click_on_a_good_segmentation_does_not_destroy_it(segmenter):
    """On the contrast the model knows, confirming a structure with a click keeps it (a too strong edge term
    measured wiping small organs out: Dice 0.94 -> 0.00)."""
    from mrannotator.phantoms import make_phantom

    ph = make_phantom("abdomen", seed=31337)
    seg = segmenter.segment(ph.image, regions=["abdomen"], probabilities=True)
    image, labels, truth = np.asarray(ph.image.dataobj), np.asarray(seg.labels.dataobj), np.asarray(ph.labels.dataobj)
    sp = voxel_spacing(ph.image.affine)
    for name in ("kidney_right", "kidney_left", "pancreas", "spleen", "gallbladder"):
        sid = CAT.get(name).id
        start = _dice(labels == sid, truth == sid)
        assert start > 0.8, (name, start)
        new = refine(image, labels, seg.probabilities[sid], sid, foreground=[_deepest(labels == sid, sp)], spacing=sp)
        assert _dice(new == sid, truth == sid) > start - 0.03, name
        changed = new != labels
        assert np.all((labels[changed] == sid) | (new[changed] == sid)), name



def test_a_boundary_click_on_a_good_proposal_leaves_the_rest_of_it(segmenter):
    """All region models merged, as served; a shoulder phantom at the training contrast gets a good proposal.
    One click by the protocol on each bone's largest error (a boundary correction) costs at most 0.04 Dice, and
    every voxel of the bone that the model was sure of and that lies beyond any click's reach (60 mm) stays.
    Without the locality rule the re-solve's edge term eroded the thin bones everywhere: clavicles 0.95 -> 0.57
    and 0.94 -> 0.51, humeri 0.97 -> 0.87 and 0.81 after one click."""
    from mrannotator.phantoms import make_phantom

    ph = make_phantom("shoulder", seed=77)
    seg = segmenter.segment(ph.image, probabilities=True)
    image, labels, truth = np.asarray(ph.image.dataobj), np.asarray(seg.labels.dataobj), np.asarray(ph.labels.dataobj)
    sp = voxel_spacing(ph.image.affine)
    names = [CAT.by_id(i).name for i in sorted(set(np.unique(truth).tolist()) - {0})]
    assert {"clavicle_left", "clavicle_right", "humerus_left", "humerus_right"} <= set(names), names
    for name in names:
        sid = CAT.get(name).id
        cur, true = labels == sid, truth == sid
        start = _dice(cur, true)
        assert start > 0.9, (name, start)
        missed, false = true & ~cur, cur & ~true
        add = missed.sum() >= false.sum()  # the larger error decides the click, as the protocol does
        point = _deepest(missed if add else false, sp)
        clicks = {"foreground": [point]} if add else {"background": [point]}
        new = refine(image, labels, seg.probabilities[sid], sid, spacing=sp, **clicks)
        assert _dice(new == sid, true) >= start - 0.04, (name, start, _dice(new == sid, true))
        grid = np.indices(cur.shape).reshape(3, -1).T
        far = (np.sqrt((((grid - np.asarray(point)) * np.asarray(sp)) ** 2).sum(axis=1)) > 60.0).reshape(cur.shape)
        sure = cur & far & (np.asarray(seg.probabilities[sid]) >= 0.9)
        assert sure.any() and np.all(new[sure] == sid), (name, int(sure.sum()), int((new[sure] != sid).sum()))


def _tube_scene(seed=5):
    """A dark tube (radius 3 voxels = 13.5 mm, along axis 2) in tissue only 2 noise SDs brighter, next to a
    block of the tube's own signal 2 voxels away (as the IVC beside the aorta), 4.5 x 4.5 x 8 mm voxels."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 24)
    i, j = np.ogrid[:40, :40]
    disc = (i - 20) ** 2 + (j - 14) ** 2 <= 3.0**2
    tube = np.repeat(disc[:, :, None], shape[2], axis=2)
    twin = np.zeros(shape, bool)
    twin[18:23, 20:26, :] = True  # similar-signal neighbour, 2 voxels from the tube's edge
    image = np.full(shape, 1100.0) + rng.normal(0, 50, shape)
    image[tube | twin] -= 100.0  # 2 noise SDs
    return image.astype(np.float32), tube, (4.5, 4.5, 8.0)


@pytest.mark.parametrize("name,expect_tube", [("aorta", True), ("liver", False)])
def test_a_click_on_a_tube_follows_it_along_the_body_without_leaking(name, expect_tube):
    """refine_shape: one click on a missed tubular structure (aorta) claims the tube over most of its slices and
    little else; the organ profile (liver), given the same image and click, spreads into the similar-signal
    neighbour and the tissue around (the failure on hard_t1's vessels: 2-3x the cross-section per slice)."""
    image, tube, sp = _tube_scene()
    sid = CAT.get(name).id
    labels = np.zeros(image.shape, np.uint8)
    new = refine(image, labels, np.zeros(image.shape, np.float32), sid, foreground=[(20, 14, 12)], spacing=sp,
                 long_axis=2) == sid
    covered = int(((new & tube).sum(axis=(0, 1)) >= 0.5 * tube[..., 0].sum()).sum())
    false = int((new & ~tube).sum())
    if expect_tube:
        assert covered >= 8 and false < 0.25 * (new & tube).sum(), (covered, false, int((new & tube).sum()))
    else:
        assert false > (new & tube).sum(), (covered, false)  # what the tube profile fixes


def _blurred_organ(seed: int):
    """A missed organ (ellipsoid, 60 x 40 x 66 mm) of strong contrast (430 in 800, noise SD 19: 19 SDs) on
    3.5 x 3.5 x 6 mm voxels, imaged as the phantoms are: blurred over 0.6 voxel, so its outermost voxels carry
    20-40 % of the tissue around it."""
    rng = np.random.default_rng(seed)
    shape, sp = (40, 40, 20), (3.5, 3.5, 6.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp, strict=True)], indexing="ij"), -1)
    organ = (((grid - [70.0, 70.0, 60.0]) / [30.0, 20.0, 33.0]) ** 2).sum(-1) <= 1
    image = ndimage.gaussian_filter(np.where(organ, 430.0, 800.0), 0.6) + rng.normal(0, 19, shape)
    return image.astype(np.float32), organ, sp


@pytest.mark.parametrize("seed", [0, 1])
def test_one_click_in_a_missed_organ_takes_its_partial_volume_border(seed):
    """One click in the middle of a missed, well-contrasted organ claims it to its border voxels and nothing
    beyond: without the partial-volume rule those voxels (about 200 of 1,125) fall outside the click's intensity
    tolerance and the organ stops at Dice 0.88-0.91, each further click fixing a few of them (t1 site's spleen)."""
    image, organ, sp = _blurred_organ(seed)
    sid = CAT.get("spleen").id
    labels = np.zeros(image.shape, np.uint8)
    new = refine(image, labels, np.zeros(image.shape, np.float32), sid, foreground=[(20, 20, 10)], spacing=sp) == sid
    missed, false = int((organ & ~new).sum()), int((new & ~organ).sum())
    assert _dice(new, organ) >= 0.95, (_dice(new, organ), missed, false)
    assert false <= 0.02 * organ.sum(), false
