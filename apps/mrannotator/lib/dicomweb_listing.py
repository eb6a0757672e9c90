"""Which PACS series the DICOMweb datastore lists, and which SEGs label them.

A mixin of :class:`lib.dicomweb_datastore.MRAnnotatorDICOMwebDatastore` (it reads the attributes that
class's ``__init__`` sets: ``_client``, ``_lock``, ``_listing``, ``_seg_listing``, ``_verdicts``,
``_seg_refs``, ``_listing_ttl_s``). Listings are re-read from the PACS after ``LISTING_TTL_S``; while the
PACS is down the last listing is kept.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset

from lib.errors import not_found
from lib.pacs import PacsUnavailable
from mrannotator.dicom.ingest import rule_failed

logger = logging.getLogger(__name__)

MR, SEG = "MR", "SEG"
# what the series rules read from each instance (QIDO includefield): ImageType, NumberOfFrames, Rows, Columns
_RULE_FIELDS = ["00080008", "00280008", "00280010", "00280011"]
# a series just stored may still be arriving: listings are re-read after this many seconds
LISTING_TTL_S = 3.0


def series_problem(series: Dataset, instances: list[Dataset]) -> str | None:
    """Why a PACS series is not an MR volume to segment, or None: the project's series rules
    (:func:`mrannotator.dicom.ingest.rule_failed`, as for a DICOM folder) on its QIDO attributes."""
    if not instances:
        return "no instances"
    for ds in instances:  # series-level attributes the rules read, on every instance as in a file
        for keyword in ("Modality", "SeriesDescription"):
            if keyword in series and keyword not in ds:
                setattr(ds, keyword, series.get(keyword))
    return rule_failed(instances)


def _dt(ds: Dataset, date: str, time_: str) -> str:
    return f"{ds.get(date, '') or ''}{ds.get(time_, '') or ''}"


class PacsListing:
    """The listing half of the DICOMweb datastore: MR series that pass the series rules, label SEGs."""

    # ------------------------------------------------------------ listing
    def _series(self) -> dict[str, dict]:
        """Listed series uid -> QIDO attributes (study uid, description), re-read after the TTL; while
        the PACS is down, the last listing (empty before the first), retried after the TTL."""
        with self._lock:
            if self._listing and time.time() - self._listing[0] < self._listing_ttl_s:
                return self._listing[1]
            try:
                return self._read_series()
            except PacsUnavailable:
                self._listing = (time.time(), self._listing[1] if self._listing else {})
                return self._listing[1]

    def _read_series(self) -> dict[str, dict]:
        with self._lock:
            found = {}
            for js in self._client.search_for_series(search_filters={"Modality": MR}):
                ds = Dataset.from_json(js)
                uid = str(ds.SeriesInstanceUID)
                if uid not in self._verdicts:
                    instances = [Dataset.from_json(i) for i in self._client.search_for_instances(
                        str(ds.StudyInstanceUID), uid, fields=_RULE_FIELDS)]
                    self._verdicts[uid] = series_problem(ds, instances)
                    if self._verdicts[uid]:
                        logger.info(f"not listing MR series {uid}: {self._verdicts[uid]}")
                if self._verdicts[uid] is None:
                    found[uid] = {"StudyInstanceUID": str(ds.StudyInstanceUID),
                                  "SeriesDescription": str(ds.get("SeriesDescription", "") or ""),
                                  "PatientID": str(ds.get("PatientID", "") or ""), "Modality": MR}
            self._listing = (time.time(), found)
            return found

    def _pacs_down(self) -> str | None:
        health = getattr(self._client, "health", None)
        return health.down if health is not None else None

    def list_images(self) -> list[str]:
        return sorted(self._series())

    def require_image(self, image_id: str) -> str:
        """The series' study uid; 404 for an id that is not a listed series."""
        series = self._series()
        if not isinstance(image_id, str) or image_id not in series:
            if self._pacs_down():  # the listing is stale or empty: the PACS is to blame, not the id
                raise PacsUnavailable(self._pacs_down())
            raise not_found(f"image {image_id!r} is not an MR series in {self.name()}")
        return series[image_id]["StudyInstanceUID"]

    def _segs(self) -> dict[str, list[dict]]:
        """Listed image uid -> its label SEGs, newest first (SEGs that are bare model results left out)."""
        with self._lock:
            if self._seg_listing and time.time() - self._seg_listing[0] < self._listing_ttl_s:
                return self._seg_listing[1]
            images = self._series()
            try:
                return self._read_segs(images)
            except PacsUnavailable:
                if self._seg_listing is None and images:  # labels never read: not guessed
                    raise
                self._seg_listing = (time.time(), self._seg_listing[1] if self._seg_listing else {})
                return self._seg_listing[1]

    def _read_segs(self, images: dict[str, dict]) -> dict[str, list[dict]]:
        with self._lock:
            by_image: dict[str, list[dict]] = {}
            quarantined = self.guard.quarantined()  # mirrored SEGs (lib/label_guard.py) label nothing
            for js in self._client.search_for_series(search_filters={"Modality": SEG}):
                ds = Dataset.from_json(js)
                uid = str(ds.SeriesInstanceUID)
                if uid not in self._seg_refs:
                    self._seg_refs[uid] = self._describe_seg(str(ds.StudyInstanceUID), uid)
                ref = self._seg_refs[uid]
                if ref["image"] in images and not ref["automatic"] and uid not in quarantined:
                    by_image.setdefault(ref["image"], []).append({"seg": uid, **ref})
            for segs in by_image.values():
                segs.sort(key=lambda r: (r["when"], r["seg"]), reverse=True)
            self._seg_listing = (time.time(), by_image)
            return by_image

    def _describe_seg(self, study: str, seg_series: str) -> dict:
        meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg_series)[0])
        refs = meta.get("ReferencedSeriesSequence") or []
        segments = meta.get("SegmentSequence") or []
        return {
            "study": study,
            "image": str(refs[0].SeriesInstanceUID) if refs else "",
            "automatic": bool(segments) and all(str(s.get("SegmentAlgorithmType", "")) == "AUTOMATIC"
                                                for s in segments),
            "when": _dt(meta, "ContentDate", "ContentTime") or _dt(meta, "SeriesDate", "SeriesTime"),
            "creator": str(meta.get("ContentCreatorName", "") or ""),
            "description": str(meta.get("SeriesDescription", "") or ""),
        }

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(self._segs())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labelled = set(self._segs())
        return [s for s in self.list_images() if s not in labelled]

    def label_segs(self, image_id: str) -> list[dict]:
        """Every label SEG of a series, newest (the final label) first."""
        self.require_image(image_id)
        return list(self._segs().get(image_id, []))

