"""Reading images with their full geometry, and writing results without ever leaving a partial file.

Everything in the engine is a :class:`nibabel.Nifti1Image` (array in stored voxel order + RAS affine).
NIfTI files, DICOM folders (through :mod:`mrannotator.dicom`), nibabel images and SimpleITK images are accepted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .limits import read_nifti_bytes
from .orientation import LPS_TO_RAS

# image and label map files, as named on the command line and in evaluation folders
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def case_name(path: Path) -> str:
    """The case a file is about: its name without the image suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    for ext in IMAGE_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def is_dicom_path(path: Path) -> bool:
    """A DICOM folder, a DICOMDIR or another DICOM file (the 'DICM' preamble), not a NIfTI / NRRD / MHA file."""
    if path.is_dir():
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_image(source, series_uid: str | None = None, *, stack: str | None = None,
               ignore_instance_gaps: bool = False) -> nib.Nifti1Image:
    """An MR volume from a path (NIfTI file, DICOM folder, DICOMDIR or DICOM file), a nibabel or a SimpleITK image.

    DICOM is read by :func:`mrannotator.dicom.read_dicom` (``series_uid`` picks one series, else the largest
    acceptable MR series; ``stack`` and ``ignore_instance_gaps`` as there). The array is read eagerly (a corrupt
    file fails here, with its name) and checked to be one 3D volume with a usable affine and finite intensities.
    """
    if series_uid is not None and not (isinstance(source, str | Path) and is_dicom_path(Path(source))):
        raise InputError(f"a series UID ({series_uid}) picks a series in a DICOM folder; {source!s:.200} is not one")
    if isinstance(source, sitk.Image):
        img = from_sitk(source)
    elif isinstance(source, nib.spatialimages.SpatialImage):
        img = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine, getattr(source, "header", None))
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if is_dicom_path(path):
            from .dicom import read_dicom

            img = read_dicom(path, series_uid, stack=stack, ignore_instance_gaps=ignore_instance_gaps)
        else:
            img = _load_nifti(path)
    return check_volume(img, str(source) if not isinstance(source, sitk.Image) else "SimpleITK image")


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        # header-declared size against the caps and the file, then a bounded read (a gzip bomb or a forged
        # header is refused before anything is allocated; a corrupt or truncated stream is named as such)
        raw = read_nifti_bytes(path)
        for cls in (nib.Nifti1Image, nib.Nifti2Image):
            try:
                img = cls.from_bytes(raw)
                break
            except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError):
                continue
        else:
            raise InputError(f"cannot read {path}: not a NIfTI image (no valid NIfTI-1/2 header)")
        data = np.asanyarray(img.dataobj)  # force the read: a short data block fails here
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types for malformed files
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return nib.Nifti1Image(data, img.affine, img.header)


def check_volume(img: nib.Nifti1Image, what: str) -> nib.Nifti1Image:
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(
            f"{what} is 4D ({data.shape[3]} volumes of {data.shape[:3]}); MRAnnotator segments one 3D "
            "volume: split the series (e.g. one echo or one time point) first"
        )
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(
            f"{what} is {'2D' if data.ndim >= 2 else f'{data.ndim}D'} (shape {data.shape}); MRAnnotator needs a "
            "3D volume with at least 2 voxels along every axis"
        )
    if data.dtype.kind not in "iuf":
        raise InputError(f"{what} has voxel type {data.dtype}; an MR magnitude image is integer or float")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{what} contains NaN or infinite intensities")
    affine = np.asarray(img.affine, float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{what} has no usable orientation (singular or missing affine)")
    out = nib.Nifti1Image(data, affine, img.header)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def whole_labels(data: np.ndarray, what: str) -> np.ndarray:
    """A label volume's values as integers (float storage allowed); InputError if any value is fractional."""
    if data.dtype.kind != "f":
        return data
    if not np.array_equal(data, np.round(data)):
        raise InputError(f"{what} has non-integer (fractional) values; a label map holds whole numbers (label ids)")
    return data.astype(np.int64)


def from_sitk(image: sitk.Image) -> nib.Nifti1Image:
    """SimpleITK (LPS, z-y-x array) to nibabel (RAS affine, x-y-z array), exactly."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the image has vector pixels (e.g. RGB); MRAnnotator needs a scalar MR volume")
    arr = sitk.GetArrayFromImage(image)
    arr = arr.transpose(tuple(range(arr.ndim))[::-1])
    d = image.GetDimension()
    if d != 3:
        raise InputError(f"the image is {d}D; MRAnnotator needs a 3D volume")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), float)
    lps[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(np.ascontiguousarray(arr), LPS_TO_RAS @ lps)


def to_sitk(img: nib.Nifti1Image, array: np.ndarray | None = None) -> sitk.Image:
    """nibabel to SimpleITK, exactly (optionally another array on the same grid, e.g. labels)."""
    arr = np.asanyarray(img.dataobj) if array is None else array
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ np.asarray(img.affine, float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    out.SetSpacing(spacing.tolist())
    out.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    out.SetOrigin(lps[:3, 3].tolist())
    return out


# ------------------------------------------------------------------ writing, atomically
def fsync_path(path: Path | str, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name_of(name: str) -> str:
    """The prefix of the temporary files :func:`write_atomic` writes next to ``name`` (hidden: a dot first)."""
    return f".{name}.tmp-"


def write_atomic(path: Path, write, fault=None) -> Path:
    """Write through a temporary file in the same folder, fsync it, rename it over ``path``, fsync the
    folder: after a crash at any moment ``path`` holds the old content or the new one, never a part.

    ``write(tmp)`` writes the content to the temporary path. ``fault(stage)``, if given, is called with
    ``"written"`` (the temporary file complete, not yet renamed) and ``"replaced"`` (renamed, folder not
    yet flushed): the server's fault-injection points. A killed write leaves at most a hidden temporary
    file (:func:`temp_name_of`), which readers of the folder skip and the owner removes at its next start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_of(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for other users (PACS, viewers) too
    try:
        write(tmp)
        fsync_path(tmp)
        if fault is not None:
            fault("written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fault is not None:
        fault("replaced")
    fsync_path(path.parent, directory=True)
    return path


def save_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    return write_atomic(path, lambda tmp: nib.save(img, tmp))


def save_json(obj, path: Path) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
