"""DICOM Structured Report of the structures' volumes: TID 1500 Measurement Report on a MRAnnotator SEG.

One TID 1411 volumetric group per SEG segment: the segment referenced (SEG instance + segment number),
its tracking identifier and UID (the SEG's), the structure's SNOMED type and category as finding type and
category (laterality as a finding site modifier), and two measurements: the volume in mL (the same number
the statistics JSON gives: voxels x voxel volume, rounded to 1 uL) and the mean MR signal intensity of the
source voxels inside it. Readable by highdicom and by dcmqi's ``tid1500reader``.

    seg = make_seg(...); sr = make_sr(seg, summary["structures"], image, labels, source_datasets)
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from .seg import ALGORITHM_NAME

UNIT_ML = ("mL", "UCUM", "milliliter")
UNIT_NONE = ("1", "UCUM", "no units")
MR_PROCEDURE = ("113091000", "SCT", "Magnetic resonance imaging")
SR_SERIES_DESCRIPTION = "MRAnnotator volumes"


def _concept(code, scheme=None, meaning=None):
    import highdicom as hd

    if scheme is None:  # a catalogue code (code, scheme, meaning attributes) or a pydicom Code
        if hasattr(code, "scheme"):
            return hd.sr.CodedConcept(code.code, code.scheme, code.meaning)
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return hd.sr.CodedConcept(code, scheme, meaning)


def mean_intensities(image: nib.Nifti1Image, labels: nib.Nifti1Image, ids: Sequence[int]) -> dict[int, float]:
    """Mean source intensity (scaled as read) inside each label id; the two images share one grid."""
    if image.shape[:3] != labels.shape[:3] or not np.allclose(image.affine, labels.affine, atol=1e-3):
        raise ValueError("the image and the label map do not lie on the same grid")
    data = np.asanyarray(image.dataobj, dtype=np.float64).reshape(labels.shape[:3])
    lab = np.asanyarray(labels.dataobj).astype(np.int64, copy=False)
    sums = np.bincount(lab.ravel(), weights=data.ravel(), minlength=256)
    counts = np.bincount(lab.ravel(), minlength=256)
    return {i: float(sums[i] / counts[i]) for i in ids if counts[i]}


def _segments_by_name(seg: Dataset) -> dict[str, Dataset]:
    return {str(item.TrackingID): item for item in seg.SegmentSequence}


def _group(seg: Dataset, item: Dataset, row: dict, mean: float, structure, algorithm, source_series: str):
    """TID 1411 group of one segment: volume (mL) and mean intensity, referencing that segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    volume = hd.sr.Measurement(name=codes.SCT.Volume, value=float(row["volume_ml"]), unit=_concept(*UNIT_ML),
                               algorithm_id=algorithm)
    intensity = hd.sr.Measurement(name=codes.DCM.MRSignalIntensity, value=round(mean, 4), unit=_concept(*UNIT_NONE),
                                  derivation=codes.SCT.Mean, algorithm_id=algorithm)
    sites = None
    if structure.laterality is not None:
        sites = [hd.sr.FindingSite(anatomic_location=_concept(structure.type),
                                   laterality=_concept(structure.laterality))]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID)),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(item.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series)),
        finding_type=_concept(structure.type),
        finding_category=_concept(structure.category),
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=[volume, intensity],
    )


def _device(device_uid: str | None):
    """The observer context naming MRAnnotator as the device that made the measurements."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid or hd.UID(), name=ALGORITHM_NAME, manufacturer_name="MRAnnotator project",
            model_name=ALGORITHM_NAME, serial_number="0"),
    )


def make_sr(
    seg: Dataset,
    rows: Sequence[dict],
    image: nib.Nifti1Image,
    labels: nib.Nifti1Image,
    source_datasets: Sequence[Dataset],
    *,
    series_number: int,
    version: str | None = None,
    device_uid: str | None = None,
    catalogue=None,
):
    """A Comprehensive 3D SR (TID 1500) with each SEG segment's volume and mean intensity.

    ``rows`` are the statistics JSON's structure rows (``Segmentation.summary()["structures"]``): their
    ``volume_ml`` is written as is, so the SR and the JSON cannot disagree. Segments are matched to rows by
    Tracking ID (the catalogue name); a row without a segment or a segment without a row is an error.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..catalogue import load_catalogue

    catalogue = catalogue or load_catalogue()
    version = (version or __version__)[:64]
    segments = _segments_by_name(seg)
    by_name = {r["name"]: r for r in rows if r.get("voxels", 1)}
    if set(segments) != set(by_name):
        raise ValueError(f"SEG segments {sorted(segments)} and report rows {sorted(by_name)} differ")
    means = mean_intensities(image, labels, [int(r["id"]) for r in by_name.values()])
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=version)
    source_series = str(source_datasets[0].SeriesInstanceUID)
    groups = [
        _group(seg, segments[name], by_name[name], means[int(by_name[name]["id"])], catalogue.get(name), algorithm,
               source_series)
        for name in sorted(by_name, key=lambda n: int(segments[n].SegmentNumber))
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(device_uid)),
        procedure_reported=_concept(*MR_PROCEDURE),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *source_datasets],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MRAnnotator",
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )
    sr.ManufacturerModelName = ALGORITHM_NAME
    sr.SoftwareVersions = version
    return sr


def volumes_from_sr(sr: Dataset) -> dict[str, dict]:
    """{tracking id: {"volume_ml", "mean_intensity", "segment_number", "seg_uid"}} read back with highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    doc = hd.sr.Comprehensive3DSR.from_dataset(sr)
    out = {}
    for group in doc.content.get_volumetric_roi_measurement_groups():
        seg_ref = group.referenced_segment
        values = {m.name: m.value for m in group.get_measurements()}
        out[group.tracking_identifier] = {
            "volume_ml": float(values[codes.SCT.Volume]),
            "mean_intensity": float(values[codes.DCM.MRSignalIntensity]),
            "segment_number": int(seg_ref.referenced_segment_numbers[0]) if seg_ref is not None else None,
            "seg_uid": str(seg_ref.referenced_sop_instance_uid) if seg_ref is not None else None,
        }
    return out
