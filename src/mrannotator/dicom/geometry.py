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

# THE geometry tolerances of MRAnnotator, used by the reader and the SEG writer alike: "one evenly spaced
# stack of parallel slices" (mm and direction cosines). Real series differ within them (a GE 3D T1 carries 32
# orientation strings differing by 6.5e-8): the reader accepts them once and both use the normalised geometry.
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
        raise StackError("several slices share one position (duplicated slices, or several echoes / b-values / "
                         "time points in one series): split it first")
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


def decimal_string(value: float, max_digits: int = 15) -> str:
    """``value`` as a DICOM Decimal String (at most 16 characters), as precise as fits (at most
    ``max_digits`` significant digits)."""
    for digits in range(max_digits, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return "0" if text in ("-0", "0") else text
    raise ValueError(f"{value} does not fit a DICOM DS")


def normalised_orientation(affine_ras: np.ndarray) -> list[str]:
    """The ImageOrientationPatient of a stack (unit row and column cosines, LPS) from its RAS affine."""
    lps = (LPS_TO_RAS @ np.asarray(affine_ras, float))[:3, :2]
    cosines = lps / np.linalg.norm(lps, axis=0)
    return [decimal_string(float(v)) for v in (*cosines[:, 0], *cosines[:, 1])]


_REPLACED = {0x00200037, 0x00280030, 0x7FE00010}  # ImageOrientationPatient, PixelSpacing, PixelData


def normalised_sources(datasets: Sequence[Dataset], affine_ras: np.ndarray) -> list[Dataset]:
    """Copies of a stack's headers that all carry the stack's one normalised orientation and pixel spacing.

    The reader accepted their orientations within COS_TOL and built ``affine_ras`` from them; a writer that
    compares orientations exactly (highdicom's ``Segmentation``) is given these copies, so it writes the
    geometry the volume was read with. Headers only: no pixel data is copied.
    """
    iop = normalised_orientation(affine_ras)
    spacing = [str(v) for v in datasets[0].PixelSpacing]
    for ds in datasets:
        if not np.allclose(header_vector(ds, "ImageOrientationPatient", 6), [float(v) for v in iop], atol=COS_TOL):
            raise StackError("the series' slices are not parallel to the volume they were read into")
    out = []
    for ds in datasets:
        copy = Dataset()
        for tag in ds.keys():  # elements shared with ``ds``, not copied; the two replaced ones are new elements
            if tag not in _REPLACED:
                copy[tag] = ds.get_item(tag)
        copy.ImageOrientationPatient = iop
        copy.PixelSpacing = spacing
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        out.append(copy)
    return out
