"""The app's datastore when ``--studies`` is a DICOMweb URL (a PACS such as Orthanc).

MONAI Label 0.8.5's own DICOMweb datastore lists CT only, converts with dcmqi (every segment typed
spleen, no laterality, values = segment numbers), and answers hand-outs of series not yet cached
with a 500. This one keeps MONAI Label's interface (it is a ``DICOMWebDatastore``) and does instead:

- images: the PACS's MR series that pass the project's series rules (no localizer, no derived
  image, one 3D stack); a series is fetched on first use and read with the project's own geometry
  code into ``CACHE/images/<SeriesInstanceUID>.nii.gz``;
- labels: a series is labelled when the PACS holds a SEG for it that is not a bare model result
  (all segments AUTOMATIC). The newest such SEG is its final label (earlier ones stay in the PACS);
  it is read into catalogue ids by code + laterality (:mod:`mrannotator.dicom.seg_read`), so training,
  scoring and strategies see NIfTI in catalogue ids;
- ``save_label``: the same checks as the local datastore, then a SEG written by the project's SEG
  writer (catalogue codes, laterality, colours, algorithm identification) is STOWed to the PACS:
  ``final`` labels as SEMIAUTOMATIC (an annotator's label), other tags (infer results) as AUTOMATIC;
- image info (hand-out records, scores) is kept per series in ``CACHE/info.json`` whether or not
  the series is cached.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import md5_digest
from pydicom.dataset import Dataset

from lib.datastore import check_name, read_volume
from lib.dicomweb_info import SeriesInfo
from lib.dicomweb_listing import LISTING_TTL_S, MR, PacsListing, series_problem
from lib.errors import bad_request, unprocessable
from lib.label_guard import LabelGuard, LabelMirrored
from lib.pacs import PacsUnavailable, guarded_client
from mrannotator.catalogue import load_catalogue
from mrannotator.dicom import SegImportError, Series, find_series, labels_from_seg, load_series, make_seg
from mrannotator.errors import InputError
from mrannotator.imageio import fsync_path, save_nifti, write_atomic
from mrannotator.labels import accept_label, check_label_ids

logger = logging.getLogger(__name__)

__all__ = ["LISTING_TTL_S", "LabelUnusable", "MRAnnotatorDICOMwebDatastore", "dicomweb_datastore", "series_problem"]


class LabelUnusable(HTTPException, InputError):
    """A label SEG that cannot be read into catalogue ids: 422 at the endpoints, an InputError for the
    trainer, scoring and strategies (which skip such a label and say why)."""

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class MRAnnotatorDICOMwebDatastore(PacsListing, SeriesInfo, DICOMWebDatastore):
    """The DICOMweb datastore: listing in :class:`PacsListing`, image info in :class:`SeriesInfo`, here the
    cache of series and images and the labels (read from SEGs, saved as SEGs)."""

    def __init__(self, client, cache_path: str | Path, allowed_label_ids: Callable[[], Iterable[int]],
                 listing_ttl_s: float = LISTING_TTL_S):
        self._client = client
        self._search_filter = {"Modality": MR}
        self._fetch_by_frame = False
        self._convert_to_nifti = True
        self._allowed_label_ids = allowed_label_ids
        self._listing_ttl_s = listing_ttl_s
        self._root = Path(cache_path) / md5_digest(client.base_url)
        for sub in ("images", "series", "segs", "labels"):
            (self._root / sub).mkdir(parents=True, exist_ok=True)
        self._info_path = self._root / "info.json"
        self.guard = LabelGuard(self._root)  # proposals kept at infer time; mirrored labels never final
        self._lock = threading.RLock()
        self._listing: tuple[float, dict[str, dict]] | None = None
        self._seg_listing: tuple[float, dict[str, list[dict]]] | None = None
        self._verdicts: dict[str, str | None] = {}  # series uid -> why not listed (None: listed)
        self._seg_refs: dict[str, dict] = {}  # SEG series uid -> {image, automatic, when, study}
        # LocalDatastore only as the place where MONAI Label expects a datastore_path; nothing watched
        LocalDatastore.__init__(self, str(self._root / "local"), auto_reload=False)

    # ------------------------------------------------------------ naming
    def name(self) -> str:
        return self._client.base_url

    def description(self) -> str:
        return f"DICOMweb {self._client.base_url} (MR series; labels are DICOM SEGs)"

    # ------------------------------------------------------------ images
    def _series_dir(self, image_id: str) -> Path:
        return self._root / "series" / image_id

    def _cached_series(self, image_id: str) -> Series:
        """The cached series (fetched once), read by the project's DICOM ingestion: sorted, checked (its
        headers, no pixels: a save passes this one Series along instead of reading the series again)."""
        study = self.require_image(image_id)
        folder = self._series_dir(image_id)
        with self._lock:
            if not folder.is_dir():
                self._client.search_for_instances(study, image_id, limit=1)  # PACS down: 503 at once
                tmp = Path(tempfile.mkdtemp(dir=self._root / "series", prefix=".fetch-"))
                try:
                    for n, ds in enumerate(self._client.retrieve_series(study, image_id)):
                        ds.save_as(tmp / f"{n:05d}.dcm", enforce_file_format=False)
                        fsync_path(tmp / f"{n:05d}.dcm")
                    fsync_path(tmp, directory=True)
                    os.replace(tmp, folder)  # the whole series or nothing
                    fsync_path(folder.parent, directory=True)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        try:
            return find_series(folder).choose(image_id)
        except InputError as e:
            raise unprocessable(f"series {image_id} cannot be read: {e}") from e

    def source_datasets(self, image_id: str) -> list[Dataset]:
        """The series' instances (with pixel data), in slice order."""
        return [pydicom.dcmread(p) for p in self._cached_series(image_id).files]

    def get_image_uri(self, image_id: str, series: Series | None = None) -> str:
        """The series' image as NIfTI in the cache, written on first use (``series``: already read)."""
        path = self._root / "images" / f"{image_id}.nii.gz"
        if not path.is_file():
            series = series or self._cached_series(image_id)
            with self._lock:
                if not path.is_file():
                    try:
                        volume = load_series(series)
                    except InputError as e:
                        raise unprocessable(f"series {image_id} cannot be read: {e}") from e
                    save_nifti(volume, path)  # crash-safe: a temporary file renamed into place
        return str(path)

    def get_image(self, image_id: str, params=None):
        return Path(self.get_image_uri(image_id)).read_bytes()

    def image_signature(self, image_id: str) -> str:
        return image_id  # a DICOM series does not change under its uid

    def add_image(self, image_id, image_filename, image_info):
        raise bad_request("this datastore is a PACS: store images with DICOM (STOW-RS or C-STORE), not here")

    def remove_image(self, image_id):
        raise bad_request("this datastore is a PACS: images are removed in the PACS, not here")

    # ------------------------------------------------------------ labels
    def _seg_dataset(self, study: str, seg_series: str) -> Dataset:
        path = self._root / "segs" / f"{seg_series}.dcm"
        if not path.is_file():
            self._client.search_for_instances(study, seg_series, limit=1)  # PACS down: 503 at once
            instances = self._client.retrieve_series(study, seg_series)
            if len(instances) != 1:
                raise unprocessable(f"SEG series {seg_series} holds {len(instances)} instances; expected one")
            write_atomic(path, lambda tmp: instances[0].save_as(tmp, enforce_file_format=False))
        return pydicom.dcmread(path)

    def final_label_path(self, image_id: str) -> str:
        """The series' newest label SEG as NIfTI in catalogue ids ("" when unlabelled); 422 if unreadable."""
        segs = self.label_segs(image_id)
        if not segs:
            return ""
        newest = segs[0]
        path = self._root / "labels" / DefaultLabelTag.FINAL / image_id / f"{newest['seg']}.nii.gz"
        if path.is_file():
            return str(path)
        seg = self._seg_dataset(newest["study"], newest["seg"])
        try:
            labels = labels_from_seg(seg, self.source_datasets(image_id))
        except SegImportError as e:
            raise LabelUnusable(f"label SEG {newest['seg']} of series {image_id}: {e}") from e
        try:
            self._check_ids(np.asanyarray(labels.dataobj), image_id)
        except HTTPException as e:
            raise LabelUnusable(f"label SEG {newest['seg']}: {e.detail}") from e
        try:
            self.guard.screen_seg(image_id, newest["seg"], labels, nib.load(self.get_image_uri(image_id)))
        except LabelMirrored:
            self._seg_listing = None  # listed again without it: an earlier SEG, if any, is final again
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        save_nifti(labels, path)
        return str(path)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        # label ids are image ids (as in the local datastore); a SEG series uid is accepted too
        image_id = image_id or label_id
        if image_id not in self._series():
            image_id = self._seg_refs.get(label_id, {}).get("image") or image_id
        if label_tag == DefaultLabelTag.FINAL:
            return self.final_label_path(image_id)
        self.require_image(image_id)
        check_name(label_tag, "label tag")
        path = self._root / "labels" / label_tag / f"{image_id}.nii.gz"
        return str(path) if path.is_file() else ""

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        out = {}
        for tag_dir in (self._root / "labels").iterdir():
            if tag_dir.name != DefaultLabelTag.FINAL and (tag_dir / f"{image_id}.nii.gz").is_file():
                out[tag_dir.name] = image_id
        if image_id in self._segs():
            out[DefaultLabelTag.FINAL] = image_id
        return out

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return self.get_labels_by_image_id(image_id).get(tag, "")

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        if label_tag == DefaultLabelTag.FINAL and label_id in self._segs():
            segs = self._segs()[label_id]
            return {"SeriesInstanceUID": segs[0]["seg"], "segs": [s["seg"] for s in segs]}
        return {}

    def _check_ids(self, data: np.ndarray, image_id: str) -> None:
        try:
            check_label_ids(data, self._allowed_label_ids(), f"label for {image_id!r}")
        except InputError as e:
            raise unprocessable(str(e)) from e

    def checked_label(self, image_id: str, label_filename: str, series: Series | None = None) -> nib.Nifti1Image:
        """The same checks as the local datastore (:func:`mrannotator.labels.accept_label`)."""
        image = nib.load(self.get_image_uri(image_id, series))
        what = f"label for {image_id!r}"
        label = read_volume(label_filename, what)
        try:
            return accept_label(label, image.shape[:3], image.affine, self._allowed_label_ids(), what)
        except InputError as e:
            raise unprocessable(str(e)) from e

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        check_name(label_tag, "label tag")
        self.require_image(image_id)
        self._client.search_for_studies(limit=1, fields=["0020000D"])  # PACS down: 503 before the SEG's work
        series = self._cached_series(image_id)  # read once: the image check and the SEG's sources use it
        label = self.checked_label(image_id, label_filename, series)
        final = label_tag == DefaultLabelTag.FINAL
        if final:  # 409 with the reason for a mirrored label (lib/label_guard.py)
            self.guard.refuse_if_mirrored(image_id, label, nib.load(self.get_image_uri(image_id, series)))
        if not final:  # an infer result (or a draft): kept in the cache for this tag
            path = self._root / "labels" / label_tag / f"{image_id}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_nifti(label, path)
        if not np.any(np.asanyarray(label.dataobj)):
            if final:
                raise unprocessable(f"label for {image_id!r} is empty: there is nothing to store as a DICOM SEG")
            return image_id
        seg_uid = self.store_seg(image_id, label, final, label_info or {}, series)
        logger.info(f"stored SEG {seg_uid} ({label_tag}) for series {image_id} in {self.name()}")
        return image_id

    def store_seg(self, image_id: str, label: nib.Nifti1Image, annotated: bool, info: dict[str, Any],
                  series: Series | None = None) -> str:
        """Write the label as the project's DICOM SEG and STOW it; returns the SEG's SeriesInstanceUID.

        ``annotated``: an annotator's label (SEMIAUTOMATIC, it becomes the series' final label), else
        a model result (AUTOMATIC, kept in the PACS for viewing but never taken as a label). ``series``:
        the cached series as :meth:`_cached_series` read it (its headers, in slice order, are the sources).
        """
        from mrannotator.catalogue import FIRST_UNCATALOGUED_ID

        catalogue = load_catalogue()
        params = info.get("params") or {}
        weights = params.get("weights") or {"source": "annotator" if annotated else "model"}
        structures = [s for s in catalogue if s.id < FIRST_UNCATALOGUED_ID]
        series = series or self._cached_series(image_id)
        try:
            seg = make_seg(label, structures, series.datasets, weights=weights, source_affine=series.affine)
        except (ValueError, InputError) as e:
            raise unprocessable(f"label for {image_id!r} cannot be written as a DICOM SEG: {e}") from e
        if annotated:
            for item in seg.SegmentSequence:
                item.SegmentAlgorithmType = "SEMIAUTOMATIC"  # a model's output corrected by a person
            seg.SeriesDescription = "MRAnnotator label"
            seg.ContentLabel = "LABEL"
            if info.get("client_id") or info.get("user"):
                seg.ContentCreatorName = str(info.get("client_id") or info.get("user"))[:64]
        try:
            self._client.store_instances([seg])
        except PacsUnavailable:
            raise
        except Exception as e:
            raise unprocessable(f"the PACS refused the SEG for {image_id!r}: {type(e).__name__}: {e}") from e
        with self._lock:
            self._seg_listing = None
        return str(seg.SeriesInstanceUID)

    def remove_label(self, label_id, label_tag):
        check_name(label_tag, "label tag")
        if label_tag == DefaultLabelTag.FINAL:
            raise bad_request("final labels are SEGs in the PACS; remove them there (they are kept for audit)")
        path = Path(self.get_label_uri(label_id, label_tag))
        if path.is_file():
            path.unlink()



def dicomweb_datastore(url: str, allowed_label_ids: Callable[[], Iterable[int]]) -> MRAnnotatorDICOMwebDatastore:
    """The datastore for ``--studies URL``, with MONAI Label's DICOMweb settings (credentials, prefixes, cache)."""
    client = guarded_client(url, settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD,
                            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or \
        str(Path.home() / ".cache" / "monailabel" / "mrannotator-dicomweb")
    return MRAnnotatorDICOMwebDatastore(client, cache, allowed_label_ids)
