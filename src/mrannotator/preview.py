"""Preview pictures: three orthogonal slices with the labels overlaid in the catalogue's colours, and a legend.

Used by ``mrannotator segment --preview`` and ``mrannotator batch --preview`` so that a reviewer can scan
hundreds of cases by eye. Display only: the volume is brought to the closest RAS orientation (axis
permutations and flips, no resampling) and shown in radiological convention (the patient's right on the
left of the axial and coronal views, the face on the left of the sagittal view); the slices go through the
centre of the labelled voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .catalogue import Structure
from .imageio import write_atomic

OVERLAY_ALPHA = 0.45


def _canonical(image: nib.Nifti1Image, labels: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, voxel spacing) in the closest RAS voxel order."""
    ornt = nib.orientations.io_orientation(image.affine)
    img = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), ornt)
    lab = nib.orientations.apply_orientation(np.asanyarray(labels.dataobj), ornt)
    spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int)]
    return np.asarray(img, np.float32), np.asarray(lab), spacing


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    idx = np.nonzero(labels)
    if not idx[0].size:
        return tuple(n // 2 for n in labels.shape)
    return tuple(int(round(float(np.mean(i)))) for i in idx)


def _views(img, lab, spacing, centre):
    """(name, image slice, label slice, extent) for axial, coronal and sagittal; rows run top to bottom."""
    i, j, k = centre
    sx, sy, sz = spacing
    # slice[row, col]; RAS: x grows to the patient's right, y anterior, z superior. Radiological display: the
    # patient's right on the viewer's left (columns flipped), anterior / superior up, the face on the left
    return [
        ("axial", img[::-1, :, k].T[::-1], lab[::-1, :, k].T[::-1], (0, img.shape[0] * sx, 0, img.shape[1] * sy)),
        ("coronal", img[::-1, j, :].T[::-1], lab[::-1, j, :].T[::-1], (0, img.shape[0] * sx, 0, img.shape[2] * sz)),
        ("sagittal", img[i, ::-1, :].T[::-1], lab[i, ::-1, :].T[::-1], (0, img.shape[1] * sy, 0, img.shape[2] * sz)),
    ]


def _colour_table(structures: Sequence[Structure]) -> np.ndarray:
    lut = np.zeros((256, 4), np.float32)
    for s in structures:
        if 0 < s.id < 256:
            lut[s.id, :3] = np.asarray(s.color, np.float32) / 255.0
            lut[s.id, 3] = OVERLAY_ALPHA
    return lut


def write_preview(image: nib.Nifti1Image, labels: nib.Nifti1Image, path: str | Path,
                  structures: Sequence[Structure], title: str = "") -> Path:
    """A PNG of three orthogonal slices of ``image`` with ``labels`` (catalogue ids) overlaid; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img, lab, spacing = _canonical(image, labels)
    lo, hi = np.percentile(img, (1, 99.5)) if img.size else (0, 1)
    lut = _colour_table(structures)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=80)
    for ax, (name, im, lb, extent) in zip(axes, _views(img, lab, spacing, _centre(lab)), strict=True):
        ax.imshow(im, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent, interpolation="nearest")
        ax.imshow(lut[lb], extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    present = [s for s in structures if (lab == s.id).any()]
    handles = [Patch(color=np.asarray(s.color) / 255.0, label=f"{s.id} {s.name}") for s in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title or "", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.08 + 0.035 * ((len(handles) - 1) // 6 + 1))
    try:
        return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
