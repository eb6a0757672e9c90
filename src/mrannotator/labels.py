"""One way to accept a label volume for an image: the server's datastores (local and DICOMweb) and
fine-tuning's data preparation all call :func:`accept_label`, so a label training sees passed the same
checks wherever it came from.

A label is accepted when it is one 3D volume (a 4D file with one volume counts) with the image's shape,
on the image's grid (affine equal within :data:`GRID_TOLERANCE_MM`), of whole numbers in 0-255 and, when
the caller names them, only of allowed catalogue ids. It comes back normalised: uint8 on the image's
affine (qform and sform code 1), which is how it is stored and trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import nibabel as nib
import numpy as np

from .errors import InputError
from .imageio import whole_labels

GRID_TOLERANCE_MM = 1e-2  # affine entries (mm): exported labels carry float32 round-off of the image's geometry


class LabelError(InputError):
    """A label volume that cannot be used with its image (the server answers 422)."""


def check_label_shape(label_shape: Sequence[int], image_shape: Sequence[int], what: str) -> None:
    """The shape test alone, e.g. on a header's declared shape before any voxel is read."""
    shape, image = tuple(int(n) for n in label_shape), tuple(int(n) for n in image_shape[:3])
    if shape[:3] != image or any(n != 1 for n in shape[3:]):
        raise LabelError(f"{what} has shape {shape}; the image has {image}")


def check_label_ids(values: np.ndarray, allowed_ids: Iterable[int], what: str) -> None:
    """Every non-zero value one of ``allowed_ids`` (the catalogue ids of the served structures)."""
    unknown = sorted({int(v) for v in np.unique(values)} - {0} - {int(i) for i in allowed_ids})
    if unknown:
        raise LabelError(f"{what} has values {unknown[:10]} that are not catalogue ids of the served "
                         "structures (see /info labels)")


def accept_label(label: nib.Nifti1Image, image_shape: Sequence[int], image_affine: np.ndarray,
                 allowed_ids: Iterable[int] | None = None, what: str = "the label volume",
                 atol: float = GRID_TOLERANCE_MM) -> nib.Nifti1Image:
    """``label`` checked against its image's grid and the allowed ids, as uint8 on the image's affine.

    Raises :class:`LabelError` (or :class:`InputError` for fractional values) naming the problem.
    """
    check_label_shape(label.shape, image_shape, what)
    affine = np.asarray(image_affine, float)
    if not np.allclose(label.affine, affine, atol=atol):
        raise LabelError(f"{what} is not on the image's grid (origin, spacing or orientation differ); "
                         "export it on the image's geometry")
    data = whole_labels(np.asanyarray(label.dataobj), what).reshape(tuple(image_shape[:3]))
    values = np.unique(data)
    if values.size and (values[0] < 0 or values[-1] > 255):
        raise LabelError(f"{what} has values from {values[0]} to {values[-1]}; label values are catalogue ids 0-255")
    if allowed_ids is not None:
        check_label_ids(values, allowed_ids, what)
    out = nib.Nifti1Image(data.astype(np.uint8), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out
