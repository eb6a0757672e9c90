"""A simulated annotator that corrects one structure with clicks (the interactive-segmentation protocol).

Each next click goes to the voxel deepest inside the largest error region (largest connected component
of missed or false voxels, 26-connected; depth = Euclidean distance in mm to the region's border, the
image edge counting as border): a foreground click for a missed region, a background click for a false
one. After every click the refinement is run with all clicks so far and Dice is recorded.

Conventions (stated in bench/README.md): ``dices[k]`` is Dice after ``k`` clicks (``dices[0]`` the
start); NoC@t is the first ``k`` with ``dices[k] >= t``, or ``max_clicks`` when never reached (the usual
cap of the literature; :func:`noc` also says whether it was reached); Dice@k is ``dices[k]`` (once no
error is left, no click is placed and Dice stays).

    from mrannotator.evaluation.clicks import simulate, noc
    run = simulate(refine_fn, labels, truth_mask, label_id, spacing=(1, 1, 1))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Click:
    point: tuple[int, int, int]  # voxel index (i, j, k) of the image as stored
    foreground: bool


@dataclass
class ClickRun:
    dices: list[float]  # Dice after 0, 1, ... clicks
    clicks: list[Click] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # refinement time of each click


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    denom = int(truth.sum()) + int(pred.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(truth, pred).sum()) / denom


def next_click(truth: np.ndarray, pred: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Click | None:
    """The click at the voxel deepest inside the largest error region, or None when ``pred == truth``."""
    from scipy import ndimage

    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    best = None  # (size, foreground, component mask)
    for foreground, error in ((True, truth & ~pred), (False, pred & ~truth)):
        if not error.any():
            continue
        comps, n = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), foreground, comps == k + 1)
    if best is None:
        return None
    _, foreground, region = best
    # pad with background so that the image edge counts as the region's border
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    point = np.unravel_index(int(np.argmax(depth)), region.shape)
    return Click(tuple(int(x) for x in point), foreground)


def simulate(refine: Callable[[list, list], np.ndarray], start: np.ndarray, truth: np.ndarray, label_id: int,
             max_clicks: int = 20, spacing=(1.0, 1.0, 1.0),
             enough: Callable[[list[float]], bool] | None = None) -> ClickRun:
    """Click until no error is left or ``max_clicks``; ``refine(foreground, background)`` -> new label map.

    ``start`` is the label map before any click; ``truth`` the structure's true mask; ``enough(dices)``
    may end the run early (e.g. once every figure wanted is known).
    """
    truth = np.asarray(truth, bool)
    current = np.asarray(start) == label_id
    run = ClickRun(dices=[dice(truth, current)])
    fg: list[tuple[int, int, int]] = []
    bg: list[tuple[int, int, int]] = []
    for _ in range(max_clicks):
        if enough is not None and enough(run.dices):
            break
        click = next_click(truth, current, spacing)
        if click is None:
            run.dices.append(run.dices[-1])
            continue
        (fg if click.foreground else bg).append(click.point)
        t0 = time.perf_counter()
        labels = refine(list(fg), list(bg))
        run.seconds.append(time.perf_counter() - t0)
        run.clicks.append(click)
        current = np.asarray(labels) == label_id
        run.dices.append(dice(truth, current))
    return run


def noc(dices: list[float], threshold: float, max_clicks: int = 20) -> tuple[int, bool]:
    """(clicks to reach ``threshold``, reached?); ``max_clicks`` when never reached."""
    for k, d in enumerate(dices[: max_clicks + 1]):
        if d >= threshold:
            return k, True
    return max_clicks, False


def dice_at(dices: list[float], k: int) -> float:
    return dices[min(k, len(dices) - 1)]
