"""DICOM in MRAnnotator: one ingestion path (:mod:`.ingest`) and the DICOM SEG writer / reader (:mod:`.seg`).

    from mrannotator.dicom import find_series, load_series, read_dicom
"""

from .geometry import StackError, stack_geometry
from .ingest import MIN_SLICES, Rejected, Series, SeriesScan, find_series, load_series, read_dicom, report
from .seg import ALGORITHM_NAME, labels_from_seg, make_seg

__all__ = [
    "ALGORITHM_NAME",
    "MIN_SLICES",
    "Rejected",
    "Series",
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
