"""Lossless reorientation: voxel axes are only permuted and flipped, never resampled.

Orientations are nibabel axis codes (the direction each voxel index increases towards), e.g.
``("L", "A", "S")`` for the official MRAnnotator models. For an oblique image the nearest axes are
used and the affine keeps its obliquity, so the physical position of every voxel is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM / ITK patient axes <-> nibabel's (RAS)


@dataclass(frozen=True)
class Reorientation:
    """How an array was brought to a target orientation, so that a result can be brought back."""

    transform: np.ndarray  # nibabel ornt from the source to the target orientation
    source_shape: tuple[int, ...]
    source_affine: np.ndarray
    target_affine: np.ndarray

    @property
    def identity(self) -> bool:
        return bool(np.all(self.transform[:, 0] == np.arange(3)) and np.all(self.transform[:, 1] == 1))

    def restore(self, array: np.ndarray) -> np.ndarray:
        """An array on the target grid (spatial axes first) back on the source grid, exactly."""
        out = nib.orientations.apply_orientation(array, _inverse(self.transform))
        if out.shape[:3] != tuple(self.source_shape[:3]):
            raise ValueError(f"array of shape {array.shape} does not come from this reorientation")
        return np.ascontiguousarray(out)


def _inverse(transform: np.ndarray) -> np.ndarray:
    """The ornt that undoes ``transform`` (source axis i went to axis transform[i, 0], flipped if -1)."""
    inv = np.zeros_like(transform)
    for src_axis, (dst_axis, flip) in enumerate(transform):
        inv[int(dst_axis)] = (src_axis, flip)
    return inv


def reorient_to(array: np.ndarray, affine: np.ndarray, axcodes=("L", "A", "S")) -> tuple[np.ndarray, np.ndarray,
                                                                                          Reorientation]:
    """``array`` (spatial axes first) with ``affine`` as stored in ``axcodes``; exact, no interpolation."""
    src = nib.orientations.io_orientation(affine)
    tr = nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = nib.orientations.apply_orientation(array, tr)
    new_affine = affine @ nib.orientations.inv_ornt_aff(tr, array.shape[:3])
    return np.ascontiguousarray(out), new_affine, Reorientation(tr, array.shape, affine, new_affine)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: column norms of the affine (right for oblique images too)."""
    return tuple(float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
