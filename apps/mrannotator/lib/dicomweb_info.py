"""Image info (hand-out records, scores), status, the JSON view and the training list of the DICOMweb datastore.

A mixin of :class:`lib.dicomweb_datastore.MRAnnotatorDICOMwebDatastore` (it reads ``_root`` and
``_info_path`` set by that class's ``__init__`` and its listing and label methods). Image info is kept per
series in ``CACHE/info.json`` whether or not the series is cached, written under a file lock because
MONAI Label's train and scoring subprocesses write it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.interfaces.datastore import DefaultLabelTag

from mrannotator.imageio import write_atomic

logger = logging.getLogger(__name__)


class SeriesInfo:
    """Per-series info, status and views over the listing (see the module docstring)."""

    def _read_info(self) -> dict:
        try:
            return json.loads(self._info_path.read_text())
        except (OSError, ValueError):
            return {}

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        series = self._series()
        if image_id not in series:
            return {}
        info = {**series[image_id], "SeriesInstanceUID": image_id, **self._read_info().get(image_id, {}),
                **self.guard.image_info(image_id)}  # why a SEG of it was quarantined (lib/label_guard.py)
        cached = self._root / "images" / f"{image_id}.nii.gz"
        if cached.is_file():
            info["path"] = str(cached)
        return info

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self.require_image(image_id)  # any listed series, fetched or not
        with FileLock(str(self._info_path) + ".lock"):  # train/scoring subprocesses write here too
            data = self._read_info()
            data.setdefault(image_id, {}).update(info)
            write_atomic(self._info_path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, default=str)))

    def datalist(self, full_path=True) -> list[dict[str, Any]]:
        out = []
        for image_id in self.get_labeled_images():
            try:
                out.append({"image": self.get_image_uri(image_id), "label": self.final_label_path(image_id)})
            except Exception as e:  # one unreadable SEG must not stop training on the others
                logger.error(f"not training on {image_id}: {getattr(e, 'detail', e)}")
        return out

    def status(self) -> dict[str, Any]:
        total = len(self.list_images())
        if self._pacs_down():  # /info/ still answers: the last listing and why the PACS is not used
            return {"total": total, "completed": len(self._seg_listing[1] if self._seg_listing else {}),
                    "pacs": self._pacs_down()}
        return {"total": total, "completed": len(self.get_labeled_images()),
                "label_tags": {DefaultLabelTag.FINAL: len(self.get_labeled_images())}}

    def json(self):
        objects = {}
        for image_id in self.list_images():
            labels = {}
            for tag in self.get_labels_by_image_id(image_id):
                labels[tag] = {"info": self.get_label_info(image_id, tag)}
            objects[image_id] = {"image": {"info": self.get_image_info(image_id)}, "labels": labels}
        return {"name": self.name(), "description": self.description(), "objects": objects}
