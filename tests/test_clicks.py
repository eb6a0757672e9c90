"""The simulated clicking annotator: where each click goes, and the NoC / Dice@k bookkeeping."""

import numpy as np
import pytest
from scipy import ndimage

from mrannotator.evaluation.clicks import dice, dice_at, next_click, noc, simulate

pytestmark = pytest.mark.unit


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_missed_region_gets_a_foreground_click_at_its_centre():
    truth = _cube((20, 20, 20), (5, 5, 5), (16, 16, 16))  # 11^3, centre (10, 10, 10)
    click = next_click(truth, np.zeros_like(truth))
    assert click.foreground and click.point == (10, 10, 10)


def test_largest_error_wins_and_a_false_region_gets_a_background_click():
    truth = _cube((40, 20, 20), (2, 2, 2), (9, 9, 9))
    pred = truth.copy()
    pred[2:5, 2:9, 2:9] = False  # missed: 3 x 7 x 7 = 147 voxels
    false = _cube((40, 20, 20), (20, 4, 4), (31, 15, 15))  # false: 11^3 = 1331 voxels, centre (25, 9, 9)
    click = next_click(truth, pred | false)
    assert not click.foreground and click.point == (25, 9, 9)
    # once the false region is gone, the missed slab is next: a foreground click inside it, in its middle
    click = next_click(truth, pred)
    assert click.foreground and click.point[0] == 3 and truth[click.point] and not pred[click.point]


def test_no_error_no_click_and_image_edge_is_a_border():
    truth = _cube((20, 20, 20), (0, 3, 3), (7, 10, 10))  # 7^3 touching the image edge at i = 0
    assert next_click(truth, truth) is None
    # without the edge as border the deepest voxel would be i = 0 (7 voxels from the inner face)
    assert next_click(truth, np.zeros_like(truth)).point == (3, 6, 6)


def test_depth_is_measured_in_millimetres():
    # one region: a 9^3 cube joined to a thin 15 x 15 x 3 slab; 1 mm isotropic, the cube's centre is deepest
    # (5 mm against 2); with 5 mm slices the slab is 15 mm thick and the deepest voxel moves into the slab
    truth = _cube((40, 20, 20), (2, 2, 2), (11, 11, 11)) | _cube((40, 20, 20), (11, 2, 2), (27, 17, 5))
    iso = next_click(truth, np.zeros_like(truth), (1, 1, 1))
    thick = next_click(truth, np.zeros_like(truth), (1, 1, 5))
    assert iso.point == (6, 6, 6)
    assert thick.point[0] >= 12 and thick.point[2] == 3


def test_simulate_with_a_refinement_that_adds_the_clicked_component():
    truth = _cube((40, 20, 20), (2, 2, 2), (12, 12, 12)) | _cube((40, 20, 20), (25, 5, 5), (31, 11, 11))
    comps, _ = ndimage.label(truth)
    start = np.zeros(truth.shape, np.uint8)
    start[30:38, 15:19, 15:19] = 3  # a false region of label 3
    start[0:2, 0:2, 0:2] = 7  # another structure: never touched

    def refine(fg, bg):
        out = start.copy()
        out[out == 3] = 0 if bg else 3
        for p in fg:
            out[comps == comps[p]] = 3
        return out

    run = simulate(refine, start, truth, 3, max_clicks=6)
    kinds = [c.foreground for c in run.clicks]
    assert kinds == [True, True, False]  # big cube, small cube (216 > 128 false voxels), then the false region
    assert run.dices[0] == 0.0 and run.dices[3] == 1.0 and run.dices[-1] == 1.0 and len(run.dices) == 7
    assert noc(run.dices, 0.9) == (2, True) and noc(run.dices, 0.99) == (3, True)  # 2 clicks: 0.95
    assert noc([0.1, 0.5], 0.9, 20) == (20, False)
    assert dice_at(run.dices, 1) == pytest.approx(dice(truth, (comps == comps[run.clicks[0].point]) | (start == 3)))
    assert len(run.seconds) == 3
