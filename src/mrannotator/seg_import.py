"""Former home of the SEG reader, kept so code written against it still imports: the one reader is
:mod:`mrannotator.dicom.seg_read` (``labels_from_seg``). New code imports from there."""

from .dicom.seg_read import SEG_STORAGE, SegImportError, segment_structures, structure_of_segment
from .dicom.seg_read import labels_from_seg as labels_from_any_seg

__all__ = ["SEG_STORAGE", "SegImportError", "labels_from_any_seg", "segment_structures", "structure_of_segment"]
