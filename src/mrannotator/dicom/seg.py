"""DICOM SEG of a catalogue label map, written on a series' own grid, and read back.

The label map must lie on the grid :mod:`mrannotator.dicom.ingest` builds for the source series
(slice k = k-th instance along the slice normal); the geometry is checked, never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from ..errors import InputError
from .geometry import normalised_sources, stack_geometry

ALGORITHM_NAME = "MRAnnotator"


def _code(c):
    from pydicom.sr.coding import Code

    return Code(c.code, c.scheme, c.meaning)


def _frames(labels: nib.Nifti1Image, structures, source_datasets: Sequence[Dataset], source_affine=None):
    """(source instances in slice order, segment frames (slice, row, column), catalogue ids present).

    The instances are copies carrying the stack's one normalised orientation (the reader's tolerance, not
    highdicom's exact comparison, decides whether the slices are parallel)."""
    if source_affine is None:
        order, affine = stack_geometry(source_datasets)
    else:  # already sorted by mrannotator.dicom.find_series (a Series' datasets and affine): no second sort
        order, affine = list(range(len(source_datasets))), np.asarray(source_affine, float)
    if not np.allclose(affine, labels.affine, atol=1e-3):
        raise ValueError("the label map does not lie on the grid of the source series")
    data = np.asanyarray(labels.dataobj)
    present = sorted({int(v) for v in np.unique(data)} - {0})
    known = {s.id for s in structures}
    missing = [v for v in present if v not in known]
    if missing:
        raise ValueError(f"label values {missing} have no catalogue structure")
    if not present:
        raise InputError("no structure was found in the series: there is nothing to put in a DICOM SEG")
    lut = np.zeros(256, np.uint8)
    for n, sid in enumerate(present, 1):
        lut[sid] = n
    ordered = normalised_sources([source_datasets[i] for i in order], affine)
    return ordered, lut[data].transpose(2, 1, 0), present


def _segment_descriptions(present: list[int], structures, algorithm) -> list:
    """One segment per structure present, numbered 1..N in catalogue id order, with its codes and colour."""
    import highdicom as hd

    by_id = {s.id: s for s in structures}
    descriptions = []
    for n, sid in enumerate(present, 1):
        s = by_id[sid]
        d = hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.display[:64],
            segmented_property_category=_code(s.category),
            segmented_property_type=_code(s.type),
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
            tracking_id=s.name[:64],
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*s.color),
        )
        if s.laterality is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(s.laterality.code, s.laterality.scheme, s.laterality.meaning)
            ]
        descriptions.append(d)
    return descriptions


def _provenance(weights: dict, version: str, model_creator: str, model_name: str):
    """(algorithm identification, the model's contributing equipment item), as IHE AIR asks."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = str(weights.get("source", "?"))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=version[:64],
        source=f"{source} weights"[:64],
        parameters={"weights": source, "models": ",".join(weights.get("models", []))},
    )
    equipment = hd.ContributingEquipment(
        manufacturer=model_creator,
        # CID 7005 (DCM 109102); IHE AIR's placeholder (Newcode1, 99IHE) is not a valid DICOM code
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{model_name} ({source} weights)"[:64],
        software_versions=version[:64],
    )
    return algorithm, equipment


def make_seg(
    labels: nib.Nifti1Image,
    structures,
    source_datasets: Sequence[Dataset],
    *,
    weights: dict,
    model_creator: str = "MRAnnotator project",
    model_name: str = "MRAnnotator nnU-Net v2",
    model_version: str | None = None,
    device_uid: str | None = None,
    series_number: int | None = None,
    source_affine: np.ndarray | None = None,
):
    """A DICOM SEG (BINARY, empty frames omitted) of a catalogue label map on a series' own grid.

    ``labels`` must lie on the grid of ``source_datasets`` as :func:`mrannotator.dicom.load_series` builds
    it (slice k = k-th instance along the slice normal; the headers are enough, no pixel data). One segment
    per structure present, numbered in catalogue id order, with the catalogue's SNOMED category / type,
    laterality modifier and colour, the algorithm identification (name, version, weights used) and the
    model in the contributing equipment (Manufacturer, model name, version, Device UID), as IHE AIR asks.
    With ``source_affine`` (a :class:`~mrannotator.dicom.Series`' ``affine``, its ``datasets`` as the source)
    the instances are taken as already in slice order.
    """
    import highdicom as hd

    from .. import __version__

    ordered, frames, present = _frames(labels, structures, source_datasets, source_affine)
    algorithm, equipment = _provenance(weights, model_version or __version__, model_creator, model_name)
    number = series_number if series_number is not None else 1000 + int(getattr(ordered[0], "SeriesNumber", 0) or 0)
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(present, structures, algorithm),
        series_instance_uid=hd.UID(),
        series_number=number % 2**31,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MRAnnotator",
        manufacturer_model_name="MRAnnotator",
        software_versions=__version__,
        device_serial_number="0",
        content_label="MRANNOTATOR",
        content_description=f"MRAnnotator automatic segmentation ({len(present)} structures)"[:64],
        series_description="MRAnnotator segmentation",
        omit_empty_frames=True,
        contributing_equipment=[equipment],
    )
    if device_uid:  # highdicom adds an item for itself: put the model's Device UID on the model's item
        mine = [i for i in seg.ContributingEquipmentSequence if i.Manufacturer == model_creator]
        mine[0].DeviceUID = device_uid
    return seg

