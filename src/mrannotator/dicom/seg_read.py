"""The one DICOM SEG reader: any SEG of a series -> a label map in catalogue ids on that series' grid.

A SEG from anywhere (ours, OHIF's export, 3D Slicer / dcmqi, highdicom) numbers its segments as it
likes, so segment numbers mean nothing here. Each segment is matched to a catalogue structure by its
Segmented Property Type code and laterality modifier (kidney 64033007 + left 7771000 = kidney_left);
when the code is not one the catalogue holds (OHIF's generic "Tissue", an SRT code, a missing
modifier), by its Segment Label against the catalogue's names. A segment that matches neither is
refused with an error naming it: a label is never guessed. Our own SEGs (:func:`mrannotator.dicom.make_seg`)
carry catalogue codes and laterality, so they read back by code like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from ..catalogue import LabelCatalogue, Structure, load_catalogue
from ..errors import InputError
from .geometry import stack_geometry
from .labelmap_seg import labelmap_pixels

logger = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# Label Map Segmentation Storage (DICOM Sup 243): what OHIF 3.13 exports; highdicom reads it as a LABELMAP SEG
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


class SegImportError(InputError):
    """A SEG that cannot be read into catalogue ids (unknown segment, other series, not a SEG)."""


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def structure_of_segment(segment: Dataset, catalogue: LabelCatalogue | None = None) -> Structure:
    """The catalogue structure one item of SegmentSequence stands for; SegImportError if none."""
    catalogue = catalogue or load_catalogue()
    number = segment.get("SegmentNumber", "?")
    label = str(segment.get("SegmentLabel", "") or "")
    prop = _first(segment, "SegmentedPropertyTypeCodeSequence")
    code = scheme = meaning = None
    laterality = None
    if prop is not None:
        code, scheme, meaning = str(prop.get("CodeValue", "")), str(prop.get("CodingSchemeDesignator", "")), \
            str(prop.get("CodeMeaning", ""))
        modifier = _first(prop, "SegmentedPropertyTypeModifierCodeSequence")
        if modifier is not None:
            laterality = (str(modifier.get("CodingSchemeDesignator", "")), str(modifier.get("CodeValue", "")))
    if code:
        for s in catalogue:
            if (s.type.scheme, s.type.code) != (scheme, code):
                continue
            mine = (s.laterality.scheme, s.laterality.code) if s.laterality else None
            if mine == laterality:
                return s
    by_name = catalogue.find(label) if label else None
    if by_name is None and label:
        by_name = next((s for s in catalogue if s.display.lower() == label.strip().lower()), None)
    if by_name is not None:
        return by_name
    modifier = f", modifier {laterality[0]}:{laterality[1]}" if laterality else ""
    coded = f"{meaning or '?'} ({scheme}:{code}{modifier})" if code else "no property type code"
    raise SegImportError(
        f"segment {number} {label!r} ({coded}) is not in the MRAnnotator label catalogue: "
        "give it a catalogue code with its laterality modifier, or a catalogue name as its label"
    )


def segment_structures(seg: Dataset, catalogue: LabelCatalogue | None = None) -> dict[int, Structure]:
    """Segment number -> catalogue structure for every segment of ``seg`` (all must match)."""
    catalogue = catalogue or load_catalogue()
    out = {}
    for item in seg.get("SegmentSequence", []):
        if str(item.get("SegmentLabel", "") or "").strip().lower() == "background":
            # viewers list the label 0 of a MONAI Label model as a segment (OHIF's MONAI Label panel, for the
            # refine task's "background" points): it stands for no structure, so it is not read
            logger.info(f"SEG segment {item.get('SegmentNumber', '?')} 'background' is not a structure: left out")
            continue
        out[int(item.SegmentNumber)] = structure_of_segment(item, catalogue)
    if not out:
        raise SegImportError("the SEG has no segments")
    twice = {s.name for s in out.values() if list(out.values()).count(s) > 1}
    if twice:
        logger.info(f"SEG holds several segments for {sorted(twice)}; they are merged")
    return out


def labels_from_seg(seg: Dataset, source_datasets: Sequence[Dataset],
                    catalogue: LabelCatalogue | None = None) -> nib.Nifti1Image:
    """The SEG as a uint8 label map in catalogue ids on the grid of ``source_datasets``.

    Frames are placed by the source instance they reference (highdicom checks the references), so a
    SEG with empty frames omitted, or frames in another order, lands on the right slices. Where two
    segments overlap, the later segment in the SEG wins.
    """
    import highdicom as hd

    if str(seg.get("SOPClassUID", "")) not in (SEG_STORAGE, LABEL_MAP_SEG_STORAGE):
        raise SegImportError(f"not a DICOM SEG (SOP class {seg.get('SOPClassUID', 'missing')})")
    structures = segment_structures(seg, catalogue)
    try:
        order, affine = stack_geometry(source_datasets)
        ordered = [source_datasets[i] for i in order]
    except InputError as e:
        raise SegImportError(f"the SEG's source series cannot be read: {e}") from e
    try:
        numbers = sorted(structures)
        if str(seg.SOPClassUID) == LABEL_MAP_SEG_STORAGE and "FrameContentSequence" not in \
                seg.PerFrameFunctionalGroupsSequence[0]:  # OHIF 3.13's export: highdicom refuses it
            pixels = labelmap_pixels(seg, ordered, numbers)
        else:
            hseg = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg, copy=False)
            pixels = hseg.get_pixels_by_source_instance(
                [ds.SOPInstanceUID for ds in ordered], segment_numbers=numbers, combine_segments=False,
                ignore_spatial_locations=True, assert_missing_frames_are_empty=True, dtype=np.float32,
            )  # (instances, rows, columns, segments)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise SegImportError(f"the SEG does not fit the series {ordered[0].SeriesInstanceUID}: {e}") from e
    if pixels.shape[1:3] != (int(ordered[0].Rows), int(ordered[0].Columns)):
        raise SegImportError(f"SEG frames are {pixels.shape[1:3]}; the series' slices are "
                             f"{(int(ordered[0].Rows), int(ordered[0].Columns))}")
    labels = np.zeros(pixels.shape[:3], np.uint8)
    for k, number in enumerate(numbers):  # fractional SEGs come rescaled to 0..1
        labels[pixels[..., k] >= 0.5] = structures[number].id
    out = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)  # -> (i=col, j=row, k=slice)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out
