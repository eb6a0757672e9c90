"""MONAI Label's local datastore, with what it lets through refused at the door.

MONAI Label 0.8.5 stores a label of any shape, writes ``tag=../../x`` outside the studies folder and
answers an unknown image id with a bare 500. Here every image id, tag and label is checked first; a
label is stored only if it is a readable 3D volume on its image's grid with catalogue ids, and it is
stored normalised (NIfTI, uint8, the image's affine), so training never sees anything else.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monailabel.datastore.local import LocalDatastore

from lib.errors import bad_request, not_found, unprocessable
from mrannotator.errors import InputError
from mrannotator.imageio import load_image, save_nifti, whole_labels

logger = logging.getLogger(__name__)

# ids and tags become file and folder names: letters, digits, and . _ - inside (no separators, no "..")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise bad_request(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only "
                          "(no path separators, no '..')")
    return value


def read_volume(path: str | Path, what: str) -> nib.Nifti1Image:
    """A NIfTI or NRRD file as a checked nibabel volume; 422 with the reason when it cannot be used."""
    path = Path(path)
    try:
        if path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as e:
                raise InputError(f"cannot read {what}: {str(e).strip().splitlines()[-1]}") from e
            return load_image(image)
        return load_image(path)
    except InputError as e:
        raise unprocessable(f"{what}: {e}") from e


class MRAnnotatorDatastore(LocalDatastore):
    def __init__(self, *args, allowed_label_ids: Callable[[], Iterable[int]], **kwargs):
        self._allowed_label_ids = allowed_label_ids
        super().__init__(*args, **kwargs)

    def require_image(self, image_id: str) -> str:
        """The image's path; 404 for an id the datastore does not hold."""
        if not isinstance(image_id, str) or image_id not in self._datastore.objects:
            raise not_found(f"image {image_id!r} is not in the datastore")
        return self.get_image_uri(image_id)

    def add_image(self, image_id, image_filename, image_info):
        if image_id:
            check_name(image_id, "image id")
        read_volume(image_filename, "uploaded image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        check_name(label_tag, "label tag")
        image_path = self.require_image(image_id)
        try:  # read fully: a label for an image that training cannot read would only fail later
            image = load_image(image_path)
            shape, affine = image.shape[:3], image.affine
        except InputError as e:
            raise unprocessable(f"image {image_id!r} cannot be read, so no label can be stored for it: {e}") from e
        label = read_volume(label_filename, f"label for {image_id!r}")
        if label.shape != tuple(shape):
            raise unprocessable(f"label for {image_id!r} has shape {label.shape}; the image has {tuple(shape)}")
        if not np.allclose(label.affine, affine, atol=1e-2):
            raise unprocessable(f"label for {image_id!r} is not on the image's grid (origin, spacing or "
                                "orientation differ); export it on the image's geometry")
        try:
            data = whole_labels(np.asanyarray(label.dataobj), f"label for {image_id!r}")
        except InputError as e:
            raise unprocessable(str(e)) from e
        values = {int(v) for v in np.unique(data)} - {0}
        unknown = sorted(values - set(self._allowed_label_ids()))
        if unknown:
            raise unprocessable(f"label for {image_id!r} has values {unknown[:10]} that are not catalogue ids of "
                                "the served structures (see /info labels)")
        normalised = nib.Nifti1Image(data.astype(np.uint8), affine)
        normalised.set_qform(affine, code=1)
        normalised.set_sform(affine, code=1)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_nifti(normalised, Path(tmp) / f"{image_id}.nii.gz")
            return super().save_label(image_id, str(path), label_tag, label_info)

    def remove_label(self, label_id, label_tag):
        check_name(label_tag, "label tag")
        return super().remove_label(label_id, label_tag)

    def image_signature(self, image_id: str) -> str:
        st = os.stat(self.require_image(image_id))
        return f"{st.st_mtime_ns}:{st.st_size}"
