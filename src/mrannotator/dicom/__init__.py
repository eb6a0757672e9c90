"""DICOM in MRAnnotator: one ingestion path (:mod:`.ingest`), the DICOM SEG writer (:mod:`.seg`) and the one
SEG reader (:mod:`.seg_read`: any SEG, matched to the catalogue by code + laterality, else by name).

    from mrannotator.dicom import find_series, load_series, read_dicom
"""

from .geometry import StackError, stack_geometry
from .ingest import MIN_SLICES, Rejected, Series, SeriesScan, find_series, load_series, read_dicom, report
from .seg import ALGORITHM_NAME, make_seg
from .seg_read import SegImportError, labels_from_seg

__all__ = [
    "ALGORITHM_NAME",
    "MIN_SLICES",
    "Rejected",
    "Series",
    "SegImportError",
    "SeriesScan",
    "StackError",
    "find_series",
    "labels_from_seg",
    "load_series",
    "make_seg",
    "read_dicom",
    "report",
    "stack_geometry",
]
