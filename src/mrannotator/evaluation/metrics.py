"""One case: both label maps on one grid as catalogue ids, then Dice, HD95 and ASD per structure (MONAI)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..catalogue import LabelCatalogue, load_catalogue
from ..errors import InputError
from .labelmaps import LabelMap, identity_map, load_label_map

# prediction and truth grids must agree to this (mm in the affine) to be compared voxel by voxel
GRID_TOLERANCE_MM = 1e-3


def _as_label_image(source, what: str):
    """A label volume as a nibabel image with integer values (paths and images accepted)."""
    from ..imageio import load_image, whole_labels

    img = load_image(source)
    return img, whole_labels(np.asanyarray(img.dataobj), what)


def _same_grid(a_aff, a_shape, b_aff, b_shape) -> bool:
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_aff, b_aff, atol=GRID_TOLERANCE_MM, rtol=0)


def _describe_grid(aff, shape) -> str:
    import nibabel as nib

    from ..orientation import voxel_spacing

    sp = ", ".join(f"{s:.3g}" for s in voxel_spacing(aff))
    codes = "".join(nib.orientations.aff2axcodes(aff))
    origin = ", ".join(f"{x:.1f}" for x in np.asarray(aff)[:3, 3])
    return f"{tuple(int(n) for n in shape)} voxels of ({sp}) mm, {codes}, origin ({origin})"


def align_to_truth(pred_data: np.ndarray, pred_affine, truth_data: np.ndarray, truth_affine, case: str = ""):
    """The prediction on the truth's grid: as is, or losslessly re-stored (axis permutation / flip only).

    Raises InputError when the two grids differ in anything else (size, spacing, position): evaluating
    then would need resampling, which changes the labels being judged.
    """
    import nibabel as nib

    from ..orientation import reorient_to

    if _same_grid(pred_affine, pred_data.shape, truth_affine, truth_data.shape):
        return pred_data, False
    codes = nib.orientations.aff2axcodes(truth_affine)
    arr, aff, _ = reorient_to(pred_data, np.asarray(pred_affine, float), codes)
    if _same_grid(aff, arr.shape, truth_affine, truth_data.shape):
        return arr, True
    raise InputError(
        f"{case + ': ' if case else ''}prediction and truth are on different grids: prediction "
        f"{_describe_grid(pred_affine, pred_data.shape)}, truth {_describe_grid(truth_affine, truth_data.shape)}; "
        "resample the prediction onto the truth image (nearest neighbour) before evaluating"
    )


def _to_ids(data: np.ndarray, lmap: LabelMap) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Catalogue ids, plus {value: voxels} of values the map ignores and of values nobody knows."""
    values, inverse, counts = np.unique(data, return_inverse=True, return_counts=True)
    lut = np.zeros(len(values), np.uint8)
    ignored, unknown = {}, {}
    for k, (v, n) in enumerate(zip(values.tolist(), counts.tolist(), strict=True)):
        if v == 0:
            continue
        if v in lmap.ids:
            lut[k] = lmap.ids[v]
        elif v in lmap.ignored:
            ignored[int(v)] = int(n)
        else:
            unknown[int(v)] = int(n)
    return lut[inverse.reshape(data.shape)], ignored, unknown


def _bbox(slices_a, slices_b, sid: int, shape, margin: int = 1) -> tuple[slice, ...]:
    boxes = [s[sid - 1] for s in (slices_a, slices_b) if sid - 1 < len(s) and s[sid - 1] is not None]
    return tuple(
        slice(max(0, min(b[ax].start for b in boxes) - margin), min(shape[ax], max(b[ax].stop for b in boxes) + margin))
        for ax in range(len(shape))
    )


def measure_structures(pred_ids: np.ndarray, truth_ids: np.ndarray, spacing: Sequence[float],
                       ids: Iterable[int] | None = None, distances: bool = True) -> list[dict]:
    """Dice, HD95 (mm) and ASD (mm) per catalogue id present in either map (MONAI's metrics).

    Both arrays hold catalogue ids on the same grid; ``spacing`` is the voxel size (mm) along each
    array axis. Ids absent from both are left out. Distances are None when one side is empty (or when
    ``distances`` is False: Dice only).
    """
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    from scipy.ndimage import find_objects

    pred_ids = np.asarray(pred_ids)
    truth_ids = np.asarray(truth_ids)
    if pred_ids.shape != truth_ids.shape:
        raise InputError(f"prediction {pred_ids.shape} and truth {truth_ids.shape} differ in shape")
    present = (set(np.unique(pred_ids).tolist()) | set(np.unique(truth_ids).tolist())) - {0}
    wanted = sorted(present if ids is None else present & {int(i) for i in ids})
    boxes_p, boxes_t = find_objects(pred_ids.astype(np.int32)), find_objects(truth_ids.astype(np.int32))
    spacing = [float(s) for s in spacing]
    rows = []
    for sid in wanted:
        box = _bbox(boxes_p, boxes_t, sid, pred_ids.shape)
        p = pred_ids[box] == sid
        t = truth_ids[box] == sid
        n_p, n_t = int(p.sum()), int(t.sum())
        yp = torch.from_numpy(p[None, None].astype(np.float32))
        yt = torch.from_numpy(t[None, None].astype(np.float32))
        dice = float(compute_dice(yp, yt, include_background=True, ignore_empty=False)[0, 0])
        hd95 = asd = None
        if n_p and n_t and distances:
            hd95 = float(compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                    spacing=spacing)[0, 0])
            asd = float(compute_average_surface_distance(yp, yt, include_background=True, symmetric=True,
                                                         spacing=spacing)[0, 0])
        status = "measured" if n_p and n_t else ("missed" if n_t else "false positive")
        rows.append({"id": sid, "truth_voxels": n_t, "pred_voxels": n_p, "dice": dice, "hd95_mm": hd95,
                     "asd_mm": asd, "status": status})
    return rows


def evaluate_case(pred, truth, *, truth_labels: LabelMap | str | Path | None = None,
                  pred_labels: LabelMap | str | Path | None = None, structures: Iterable[int] | None = None,
                  case: str = "case", catalogue: LabelCatalogue | None = None) -> tuple[list[dict], list[dict]]:
    """Rows (one per structure measured) and notes (what was ignored) for one prediction/truth pair.

    ``pred`` and ``truth`` are paths or nibabel images; label maps are :class:`LabelMap` or anything
    :func:`load_label_map` reads. A grid mismatch or an unreadable file raises :class:`InputError`.
    """
    from ..orientation import voxel_spacing

    cat = catalogue or load_catalogue()
    ident = identity_map(cat)
    if isinstance(truth_labels, (str, Path)):
        truth_labels = load_label_map(truth_labels, cat)
    if isinstance(pred_labels, (str, Path)):
        pred_labels = load_label_map(pred_labels, cat)
    truth_img, truth_data = _as_label_image(truth, f"truth of {case}")
    pred_img, pred_data = _as_label_image(pred, f"prediction of {case}")
    pred_data, _ = align_to_truth(pred_data, pred_img.affine, truth_data, truth_img.affine, case)
    notes = []
    mapped = {}
    for side, data, lmap in (("truth", truth_data, truth_labels or ident), ("prediction", pred_data,
                                                                            pred_labels or ident)):
        ids, ignored, unknown = _to_ids(data, lmap)
        mapped[side] = ids
        flag = "--truth-labels" if side == "truth" else "--pred-labels"
        for v, n in sorted(unknown.items()):
            notes.append({"case": case, "skipped": f"{side} label {v}", "voxels": n, "reason": (
                f"label value {v} in the {side} is unknown: not in {lmap.source}; its voxels count as background "
                f"(give a label map with {flag})")})
        for v, n in sorted(ignored.items()):
            notes.append({"case": case, "skipped": f"{side} label {v}", "voxels": n, "reason": (
                f"label value {v} ({lmap.describe(v)}) in the {side} has no catalogue structure in {lmap.source}; "
                "ignored")})
    spacing = voxel_spacing(truth_img.affine)
    rows = measure_structures(mapped["prediction"], mapped["truth"], spacing, structures)
    for r in rows:
        s = cat.by_id(r["id"])
        r.update({"case": case, "structure": s.name, "display": s.display, "region": s.region})
    order = ("case", "region", "structure", "display", "id", "truth_voxels", "pred_voxels", "dice", "hd95_mm",
             "asd_mm", "status")
    return [{k: r[k] for k in order} for r in rows], notes
