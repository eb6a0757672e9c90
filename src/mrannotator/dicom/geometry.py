"""Geometry of one stack of DICOM slices, from the instances' own headers, exactly.

The volume's affine is built from ImagePositionPatient / ImageOrientationPatient / PixelSpacing of the
instances, never from an affine diagonal. The direction cosines are normalised first: written with 6
decimals they are not unit vectors, and multiplying them by PixelSpacing gives 0.99999997 mm spacings
that nnU-Net's resampling rounds to another size.

Voxel axes of a volume built here: i = column (increases along the row direction cosine), j = row,
k = slice (sorted along the slice normal), as SimpleITK / GDCM read series.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from ..errors import InputError
from ..orientation import LPS_TO_RAS

# tolerances for "one evenly spaced stack of parallel slices" (mm and direction cosines)
POS_TOL_MM = 1e-3
COS_TOL = 1e-4


class StackError(InputError):
    """The instances of a series are not one evenly spaced stack of parallel slices."""


def header_vector(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    """``keyword`` of ``ds`` as ``n`` floats; :class:`StackError` naming the instance when it is unusable."""
    value = getattr(ds, keyword, None)
    try:
        out = np.asarray([float(v) for v in value]) if value is not None else np.empty(0)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise StackError(f"instance {getattr(ds, 'SOPInstanceUID', '?')} has no usable {keyword}")
    return out


def slice_axes(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(row cosine, column cosine) of an instance, normalised to unit length and checked perpendicular."""
    iop = header_vector(ds, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1.0) > 1e-2 or abs(nc - 1.0) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise StackError("ImageOrientationPatient does not hold two perpendicular unit vectors")
    return row / nr, col / nc


def _check_same_plane(datasets: Sequence[Dataset], iop: np.ndarray, shape: tuple, spacing: np.ndarray) -> None:
    for ds in datasets[1:]:
        if not np.allclose(header_vector(ds, "ImageOrientationPatient", 6), iop, atol=COS_TOL):
            raise StackError("the series mixes slice orientations (e.g. a 3-plane localizer); not one 3D stack")
        if (int(ds.Rows), int(ds.Columns)) != shape or not np.allclose(
            header_vector(ds, "PixelSpacing", 2), spacing
        ):
            raise StackError("the series mixes slice sizes or pixel spacings; not one 3D stack")


def stack_geometry(datasets: Sequence[Dataset]) -> tuple[list[int], np.ndarray]:
    """(slice order, RAS affine) of one series' instances: indices of ``datasets`` along the slice normal.

    Raises :class:`StackError` when the instances are not one stack of parallel, evenly spaced slices
    of the same size (a localizer, a multi-stack or multi-echo series, missing slices).
    """
    if len(datasets) < 2:
        raise StackError("the series has a single slice; MRAnnotator needs a 3D series")
    first = datasets[0]
    row, col = slice_axes(first)
    normal = np.cross(row, col)
    spacing = header_vector(first, "PixelSpacing", 2)  # [between rows, between columns]
    if (spacing <= 0).any():
        raise StackError(f"PixelSpacing {spacing.tolist()} is not positive")
    _check_same_plane(datasets, header_vector(first, "ImageOrientationPatient", 6),
                      (int(first.Rows), int(first.Columns)), spacing)
    positions = np.array([header_vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0)
    if np.linalg.norm(steps, axis=1).min() < POS_TOL_MM:
        raise StackError("several slices share one position (multi-echo or multi-phase series?); split it first")
    if np.abs(steps - step).max() > max(POS_TOL_MM, 1e-3 * np.linalg.norm(step)):
        gaps = np.linalg.norm(steps, axis=1)
        raise StackError(
            f"incomplete or uneven stack: slices are not evenly spaced (gaps {gaps.min():.3f}..{gaps.max():.3f} mm: "
            "missing slices?)"
        )
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return [int(i) for i in order], LPS_TO_RAS @ lps
