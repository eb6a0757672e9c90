"""MONAI Label 0.8.5's local datastore made crash-safe (datastore internals fix).

Upstream ``LocalDatastore`` copies images and labels with ``shutil.copy`` straight onto the stored
file and rewrites its index ``datastore_v2.json`` in place: a SIGKILL during a label save left the
label at 0 bytes (then served as 200 with 0 bytes), one during an index rewrite left the index empty
or half-written, and the next start refused to run (exit 3) until someone deleted it.

:class:`CrashSafeLocalDatastore` keeps upstream's model, events and reconciliation, and replaces:

- every image, label and index write: a temporary file in the same folder, fsync, rename, fsync of
  the folder (:func:`mrannotator.imageio.write_atomic`), under the datastore's file lock (which
  train/scoring subprocesses take too); a stored file is always the old or the new content;
- reading the index: an unreadable one (empty, cut short, not the model) is kept aside as
  ``datastore_v2.json.unreadable-<time>`` with a warning, and the index is rebuilt from the image and
  label files (their info fields, e.g. who saved a label, are lost); a missing one is rebuilt too;
- the folder listing: hidden files (a killed write's temporary file) are never taken for images or
  labels; those left by a killed server are removed at the next start, under the lock;
- removing an image or a label: upstream refreshes its index only when ``auto_reload`` is off and
  otherwise leaves it to the file watcher, so for a while after ``DELETE /datastore/image`` answered
  200 the listing (and ``next_sample``) still offered the deleted image (seen in the suite under load:
  ``GET /datastore/?output=all`` right after the delete still held it). The index is refreshed before
  the removal returns.

Fault points (``MRANNOTATOR_DATASTORE_KILL_AT``, lib/faults.py), counted once the datastore is up:
``image:start|partial|written|replaced``, ``label:start|partial|written|replaced`` and
``index:partial|written|replaced`` (partial: half of the temporary file written).

Private MONAI Label names used here (and nowhere else): ``LocalDatastore._datastore``,
``_datastore_path``, ``_datastore_config_path``, ``_auto_reload``, ``_lock_file``, ``_extensions``, ``_config_ts``,
``_ignore_event_config``, ``_to_id``, ``_filename``, ``_list_files``, ``_update_datastore_file``,
``_init_from_datastore_file``; the models ``LocalDatastoreModel``, ``ImageLabelModel``, ``DataModel``.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from lib.faults import DATASTORE_ENV, FaultPoints
from mrannotator.imageio import write_atomic

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


class CrashSafeLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, *args, **kwargs):
        self._index_lock = threading.RLock()
        self._faults = FaultPoints(kill_at="", env=DATASTORE_ENV, what="server")  # disarmed during start-up
        had_index = os.path.exists(os.path.join(datastore_path, kwargs.get("datastore_config", "datastore_v2.json")))
        os.makedirs(datastore_path, exist_ok=True)
        _remove_temp_files(Path(datastore_path), kwargs.get("images_dir", "."), kwargs.get("labels_dir", "labels"))
        super().__init__(datastore_path, *args, **kwargs)
        if not had_index and self._datastore.objects:
            logger.warning(f"datastore index {self._datastore_config_path} was missing: rebuilt from the files "
                           f"({len(self._datastore.objects)} images)")
        self._faults = FaultPoints(env=DATASTORE_ENV, what="server")

    # ------------------------------------------------------------ public helpers for the app's datastore
    def has_image(self, image_id: str) -> bool:
        return isinstance(image_id, str) and image_id in self._datastore.objects

    def id_of(self, filename: str) -> str:
        """The image id upstream gives a file (its name without the datastore's extension)."""
        return self._to_id(os.path.basename(filename))[0]

    def label_tags(self, image_id: str) -> list[str]:
        obj = self._datastore.objects.get(image_id)
        return list(obj.labels) if obj else []

    # ------------------------------------------------------------ removals seen at once
    def remove_image(self, image_id: str) -> None:
        with self._index_lock:
            super().remove_image(image_id)
            if self._auto_reload:  # upstream refreshes only without auto reload
                self.refresh()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._index_lock:
            super().remove_label(label_id, label_tag)
            if self._auto_reload:
                self.refresh()

    # ------------------------------------------------------------ the index
    def _update_datastore_file(self, lock=True):
        with self._index_lock:
            if not lock:
                return self._write_index()
            with FileLock(self._lock_file):
                return self._write_index()

    def _write_index(self) -> None:
        self._ignore_event_config = True
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
        write_atomic(Path(self._datastore_config_path),
                     lambda tmp: self._write_stream(tmp, io.BytesIO(text), len(text), "index"),
                     fault=lambda stage: self._faults.point(f"index:{stage}"))
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _init_from_datastore_file(self, throw_exception=False):
        with self._index_lock:
            try:
                return super()._init_from_datastore_file(throw_exception=True)
            except (ValueError, OSError) as e:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
                self._set_aside_unreadable_index(e)

    def _set_aside_unreadable_index(self, error: Exception) -> None:
        index = Path(self._datastore_config_path)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        with FileLock(self._lock_file):
            aside = next(p for n in range(1, 10**6)
                         if not (p := index.with_name(f"{index.name}.unreadable-{stamp}-{n}")).exists())
            if index.exists():
                os.replace(index, aside)
        reason = " ".join(str(error).strip().splitlines()[:2]) or type(error).__name__
        logger.warning(f"datastore index {index} cannot be read ({reason}); kept as {aside.name} and rebuilt "
                       "from the image and label files (their info fields, e.g. who saved a label, are lost)")
        old = self._datastore
        self._datastore = LocalDatastoreModel(name=old.name, description=old.description,
                                              images_dir=old.images_dir, labels_dir=old.labels_dir)
        self._datastore.base_path = self._datastore_path
        self._config_ts = 0

    def _list_files(self, path, patterns):
        return {k: v for k, v in super()._list_files(path, patterns).items() if not k.startswith(".")}

    # ------------------------------------------------------------ images and labels
    def store_image(self, image_id: str, source: str, info: dict[str, Any]) -> str:
        """``add_image`` with the copy and the index written crash-safe; files of the id with another
        extension are removed once the new one is in place."""
        _, ext = self._to_id(os.path.basename(source))
        name = self._filename(image_id, ext)
        folder = Path(self._datastore.image_path())
        with self._index_lock, FileLock(self._lock_file):
            self._faults.point("image:start")
            self._copy(source, folder / name, "image")
            self._remove_other_extensions(folder, image_id, name)
            info = {**(info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def store_label(self, image_id: str, source: str, tag: str, info: dict[str, Any]) -> str:
        """``save_label`` with the copy and the index written crash-safe."""
        _, ext = self._to_id(os.path.basename(source))
        name = self._filename(image_id, ext)
        folder = Path(self._datastore.label_path(tag))
        with self._index_lock, FileLock(self._lock_file):
            obj = self._datastore.objects[image_id]
            self._faults.point("label:start")
            self._copy(source, folder / name, "label")
            self._remove_other_extensions(folder, image_id, name)
            info = {**(info or {}), "ts": int(time.time()), "name": name}
            obj.labels[tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_labels_of(self, image_id: str) -> None:
        """Every label of an image, files first (an image is replaced only once no label can pair with it)."""
        with self._index_lock, FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            for tag in list(obj.labels) if obj else []:
                Path(self.get_label_uri(image_id, tag)).unlink(missing_ok=True)
                del obj.labels[tag]
            self._update_datastore_file(lock=False)

    def _remove_other_extensions(self, folder: Path, image_id: str, keep: str) -> None:
        for pattern in self._extensions:
            other = folder / self._filename(image_id, pattern.replace("*", ""))
            if other.name != keep and other.exists():
                other.unlink()

    def _copy(self, source: str, dest: Path, what: str) -> None:
        def write(tmp: str) -> None:
            with open(source, "rb") as src:
                self._write_stream(tmp, src, os.fstat(src.fileno()).st_size, what)

        write_atomic(dest, write, fault=lambda stage: self._faults.point(f"{what}:{stage}"))

    def _write_stream(self, tmp: str, src: BinaryIO, size: int, what: str) -> None:
        """The content in chunks, with the ``partial`` fault point once half of it is written."""
        half, written, partial = size // 2, 0, False
        with open(tmp, "wb") as f:
            while chunk := src.read(min(_CHUNK, half - written) if written < half else _CHUNK):
                f.write(chunk)
                written += len(chunk)
                if written >= half and not partial:
                    f.flush()
                    self._faults.point(f"{what}:partial")
                    partial = True


def _remove_temp_files(root: Path, images_dir: str, labels_dir: str) -> None:
    """Temporary files of writes a killed process left (write_atomic's hidden ``.NAME.tmp-*``), in the
    studies, image and label folders; under the datastore's lock (the one upstream's ``.lock`` file
    gives), so no live write's file is touched."""
    with FileLock(str(root / ".lock")):
        labels = root / labels_dir
        folders = [root, root / images_dir, *(p for p in labels.glob("*") if p.is_dir())]
        for folder in folders:
            for path in folder.iterdir() if folder.is_dir() else []:
                if _is_temp(path.name) and path.is_file():
                    logger.warning(f"removing {path.name}, left in {folder} by a write that was cut short")
                    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ upload file names
_UPLOAD_FIELDS = {"add_image": "file", "save_label": "label"}  # monailabel.endpoints.datastore function -> upload
_CHECKED = "_mrannotator_upload_name_checked"


def check_upload_name(filename: str | None) -> None:
    """An image upload's file name, where it gives the image id, is a name, not a path: upstream takes the id
    from its base name, so ``studies/a.nii.gz`` or ``../a.nii.gz`` silently replaced image ``a``. 400 instead."""
    if not filename:
        return
    if any(c in filename for c in "/\\\0") or filename.startswith(".") or len(filename) > 255:
        raise HTTPException(status_code=400, detail=f"upload file name {filename[:80]!r} is not a plain file name: "
                            "send the file's name without folders (e.g. case01.nii.gz), or name the image with "
                            "image=<id>")


def install() -> None:
    """Upload file names checked before MONAI Label's datastore endpoints (``monailabel.endpoints.datastore``
    ``add_image`` / ``save_label``, looked up by its route handlers at call time) use them. Idempotent."""
    from monailabel.endpoints import datastore as endpoints

    for name, field in _UPLOAD_FIELDS.items():
        original = getattr(endpoints, name)
        if getattr(original, _CHECKED, False):
            continue
        signature = inspect.signature(original)

        def checked(*args, _original=original, _field=field, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs).arguments
            # only an image upload without image=<id> takes its id from the file name; a label's id is the
            # image= it is saved for, and clients (monailabel.client, 3D Slicer) send the local path as the name
            if _field == "file" and not bound.get("image"):
                check_upload_name(getattr(bound.get(_field), "filename", None))
            return _original(*args, **kwargs)

        functools.update_wrapper(checked, original)
        setattr(checked, _CHECKED, True)
        setattr(endpoints, name, checked)
