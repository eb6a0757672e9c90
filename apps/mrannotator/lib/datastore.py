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
from fastapi import HTTPException

from lib.errors import bad_request, conflict, not_found, unprocessable
from lib.monailabel_adapter.datastore_internals import CrashSafeLocalDatastore
from mrannotator.errors import InputError
from mrannotator.imageio import load_image, save_nifti
from mrannotator.labels import LabelError, accept_label, check_label_shape
from mrannotator.limits import Declared, TooLargeError, check_image_file

logger = logging.getLogger(__name__)

# ids and tags become file and folder names: letters, digits, and . _ - inside (no separators, no "..")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise bad_request(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only "
                          "(no path separators, no '..')")
    return value


def too_large(message: str) -> HTTPException:
    return HTTPException(status_code=413, detail=message)


def check_header(path: str | Path, what: str) -> Declared:
    """The file's declared size against the caps and the file (``mrannotator.limits``), from its header only:
    413 over a cap, 422 for a malformed or forged header. Nothing is decompressed."""
    try:
        return check_image_file(path, what)
    except TooLargeError as e:
        raise too_large(str(e)) from e
    except InputError as e:
        raise unprocessable(str(e)) from e
    except OSError as e:
        raise unprocessable(f"cannot read {what}: {e.strerror or e}") from e


def read_volume(path: str | Path, what: str) -> nib.Nifti1Image:
    """A NIfTI or NRRD file as a checked nibabel volume; 413/422 with the reason when it cannot be used."""
    path = Path(path)
    check_header(path, what)
    try:
        if path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as e:
                raise InputError(f"cannot read {what}: {str(e).strip().splitlines()[-1]}") from e
            return load_image(image)
        return load_image(path)
    except TooLargeError as e:
        raise too_large(f"{what}: {e}") from e
    except InputError as e:
        raise unprocessable(f"{what}: {e}") from e


class MRAnnotatorDatastore(CrashSafeLocalDatastore):
    """Thread-safe: requests run in worker threads (lib/monailabel_adapter/concurrency.py); LocalDatastore mutates
    its in-memory index without a lock of its own for the process. Crash-safe: every write is a temporary
    file renamed into place, and an unreadable index is rebuilt (lib/monailabel_adapter/datastore_internals.py).

    An image id that has labels is not replaced by an upload unless its params say ``"overwrite": true``
    (409 otherwise); with it, the image's labels are removed first, so no label pairs with other voxels."""

    def __init__(self, *args, allowed_label_ids: Callable[[], Iterable[int]], **kwargs):
        self._allowed_label_ids = allowed_label_ids
        self._geometry_cache: dict[tuple, tuple] = {}
        super().__init__(*args, **kwargs)

    def refresh(self):
        with self._index_lock:
            return super().refresh()

    def update_image_info(self, image_id, info):
        with self._index_lock:
            return super().update_image_info(image_id, info)

    def update_label_info(self, label_id, label_tag, info):
        with self._index_lock:
            return super().update_label_info(label_id, label_tag, info)

    def status(self):
        with self._index_lock:
            return super().status()

    def json(self):
        with self._index_lock:
            return super().json()

    def datalist(self, *args, **kwargs):
        with self._index_lock:
            return super().datalist(*args, **kwargs)

    def require_image(self, image_id: str) -> str:
        """The image's path; 404 for an id the datastore does not hold."""
        if not self.has_image(image_id):
            raise not_found(f"image {image_id!r} is not in the datastore")
        return self.get_image_uri(image_id)

    def add_image(self, image_id, image_filename, image_info):
        image_id = check_name(image_id or self.id_of(image_filename), "image id")
        info = dict(image_info or {})
        overwrite = info.pop("overwrite", False)
        if not isinstance(overwrite, bool):
            raise bad_request(f"params overwrite must be true or false, not {overwrite!r}")
        read_volume(image_filename, "uploaded image")
        with self._index_lock:
            tags = self.label_tags(image_id)
            if tags and not overwrite:
                raise conflict(f"image {image_id!r} has labels ({', '.join(sorted(tags))}): uploading another image "
                               "under its id would pair them with other voxels; use a new id, or send params "
                               '{"overwrite": true} to replace the image and remove its labels')
            if tags:
                logger.warning(f"image {image_id!r} replaced on request: its labels {sorted(tags)} are removed")
                self.remove_labels_of(image_id)
            return self.store_image(image_id, image_filename, info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        check_name(label_tag, "label tag")
        image_path = self.require_image(image_id)
        what = f"label for {image_id!r}"
        # headers first: a label bomb or a label of another shape is refused before any voxel is read
        declared = check_header(label_filename, what)
        try:
            check_label_shape(declared.shape, check_image_file(image_path, f"image {image_id!r}").shape, what)
            shape, affine = self._image_geometry(image_path)  # read fully once: training must be able to
        except LabelError as e:
            raise unprocessable(str(e)) from e
        except InputError as e:
            raise unprocessable(f"image {image_id!r} cannot be read, so no label can be stored for it: {e}") from e
        label = read_volume(label_filename, what)
        try:
            normalised = accept_label(label, shape, affine, self._allowed_label_ids(), what)
        except InputError as e:
            raise unprocessable(str(e)) from e
        if (str(label_filename).lower().endswith((".nii", ".nii.gz")) and np.asanyarray(label.dataobj).dtype == np.uint8
                and np.allclose(label.affine, affine, atol=1e-6)):
            # already as training wants it: stored byte for byte as uploaded
            return self.store_label(image_id, str(label_filename), label_tag, label_info)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_nifti(normalised, Path(tmp) / f"{image_id}.nii.gz")
            return self.store_label(image_id, str(path), label_tag, label_info)

    def _image_geometry(self, image_path: str) -> tuple[tuple[int, ...], np.ndarray]:
        """Shape and affine of an image read in full, remembered per file version (mtime, size): the
        next label for the same image is checked in milliseconds, not in the time to read the image."""
        st = os.stat(image_path)
        key = (image_path, st.st_mtime_ns, st.st_size)
        cached = self._geometry_cache.get(key)
        if cached is None:
            image = load_image(image_path)
            cached = (tuple(image.shape[:3]), np.asarray(image.affine))
            with self._index_lock:
                if len(self._geometry_cache) > 4096:
                    self._geometry_cache.clear()
                self._geometry_cache[key] = cached
        return cached

    def remove_label(self, label_id, label_tag):
        check_name(label_tag, "label tag")
        with self._index_lock:
            return super().remove_label(label_id, label_tag)

    def image_signature(self, image_id: str) -> str:
        st = os.stat(self.require_image(image_id))
        return f"{st.st_mtime_ns}:{st.st_size}"
