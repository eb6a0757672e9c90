"""MR series selector and loader: which series of the input MRAnnotator segments, and its volume.

Both are thin adapters over ``mrannotator.dicom`` (the one DICOM reader of the CLI, the API and this
app): the selector lists the input folder tree once (dangling symlinks, symlink loops and unreadable
files are skipped and logged), applies the series rules (MR only, no localizer, not derived, one
evenly spaced stack of at least MIN_SLICES slices) and picks the largest series by voxels, or the one
MRANNOTATOR_SERIES names (MRANNOTATOR_STACK / MRANNOTATOR_IGNORE_INSTANCE_GAPS as the CLI's --stack /
--ignore-instance-gaps: :mod:`input_check`, run before the heavy imports). Each series is sorted once,
there; the loader decodes the pixels in that order. With no series left an InputError lists every series
and the rule it failed; nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from input_check import selected
from monai.deploy.core import Fragment, Operator, OperatorSpec

from mrannotator.dicom import Series, load_series


@dataclass
class SeriesVolume:
    """One series (files and headers in slice order) and its volume (slice k = series.datasets[k])."""

    series: Series
    image: nib.Nifti1Image


class MRSeriesSelectorOperator(Operator):
    """(input folder) -> series: the one MR series to segment."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, series_uid: str | None = None, **kwargs):
        self.input_folder = Path(input_folder)
        self.series_uid = series_uid or None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("series")

    def compute(self, op_input, op_output, context):
        log = logging.getLogger(__name__)
        series = selected(self.input_folder, self.series_uid, log)  # checked once, before the heavy imports
        log.info(f"selected {series.description}")
        op_output.emit(series, "series")


class MRSeriesLoaderOperator(Operator):
    """series -> volume (SeriesVolume): the pixels decoded once, in the selector's slice order."""

    def setup(self, spec: OperatorSpec):
        spec.input("series")
        spec.output("volume")

    def compute(self, op_input, op_output, context):
        series = op_input.receive("series")
        image = load_series(series)
        logging.getLogger(__name__).info(f"read {series.description}: {image.shape} voxels")
        op_output.emit(SeriesVolume(series, image), "volume")
