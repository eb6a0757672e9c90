"""MR series selector: which series of the study MRAnnotator segments, and why the others were skipped.

Rules, in order (the first that fails names the reason):
  1. Modality is MR (CT, SEG, SR, PR ... are skipped).
  2. Not a localizer / scout / survey: ImageType holds none of LOCALIZER, SCOUT, and the series
     description does not read like one.
  3. Not derived: ImageType starts ORIGINAL (DERIVED / SECONDARY images are MPRs, maps, MIPs, subtractions).
  4. One 3D stack: at least MIN_SLICES slices, one slice orientation, one size, evenly spaced.
The largest 3D series (voxel count, then slice count, then lowest series number) wins. With no series
left an InputError lists every series and the rule it failed; nothing is written.
"""

from __future__ import annotations

import logging
import re

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries

from mrannotator.dicom import sort_datasets
from mrannotator.errors import InputError

MIN_SLICES = 10
SKIP_IMAGE_TYPES = {"LOCALIZER", "SCOUT"}
LOCALIZER_DESCRIPTION = re.compile(r"(?i)\b(localizer|localiser|scout|survey|3[- ]?pl(ane)?|tri[- ]?pilot|loc)\b")
SELECTION_NAME = "mr_3d"


def _first(series):
    return series.get_sop_instances()[0].get_native_sop_instance()


def describe(series) -> str:
    ds = _first(series)
    return (f"series {getattr(ds, 'SeriesNumber', '?')} '{getattr(ds, 'SeriesDescription', '') or ''}' "
            f"({getattr(ds, 'Modality', '?')}, {len(series.get_sop_instances())} images, "
            f"{series.SeriesInstanceUID})")


def rejection(series) -> str | None:
    """Why ``series`` is not segmented, or None when it is a candidate."""
    ds = _first(series)
    modality = str(getattr(ds, "Modality", "") or "unknown")
    if modality != "MR":
        return f"modality {modality}: MRAnnotator segments MR only"
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    if SKIP_IMAGE_TYPES & set(image_type) or LOCALIZER_DESCRIPTION.search(str(getattr(ds, "SeriesDescription", ""))):
        return "localizer / scout"
    if image_type and (image_type[0] != "ORIGINAL" or "SECONDARY" in image_type[1:2]):
        return "derived image (ImageType " + "\\".join(image_type) + ")"
    n = len(series.get_sop_instances())
    if n < MIN_SLICES:
        return f"only {n} slices (a 3D series has at least {MIN_SLICES})"
    try:
        sort_datasets([i.get_native_sop_instance() for i in series.get_sop_instances()])
    except InputError as e:
        return f"not one 3D stack: {e}"
    return None


def select(study_list) -> tuple[object, object, list[str]]:
    """(study, series, log lines) of the best series over all studies; InputError when there is none."""
    notes, candidates = [], []
    for study in study_list or []:
        for series in study.get_all_series():
            why = rejection(series)
            notes.append(f"{describe(series)}: {why or 'candidate'}")
            if why is None:
                ds = _first(series)
                n = len(series.get_sop_instances())
                voxels = n * int(ds.Rows) * int(ds.Columns)
                candidates.append(((-voxels, -n, int(getattr(ds, "SeriesNumber", 0) or 0)), study, series))
    if not candidates:
        found = "\n  ".join(notes) or "no DICOM series at all"
        raise InputError(f"no MR series to segment in the input; series found:\n  {found}")
    _, study, series = min(candidates, key=lambda c: c[0])
    return study, series, notes


class MRSeriesSelectorOperator(Operator):
    """dicom_study_list -> study_selected_series_list holding the one MR series to segment."""

    def __init__(self, fragment: Fragment, *args, **kwargs):
        self.input_name_study_list = "dicom_study_list"
        self.output_name_selected_series = "study_selected_series_list"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_study_list)
        spec.output(self.output_name_selected_series).condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        study, series, notes = select(op_input.receive(self.input_name_study_list))
        log = logging.getLogger(__name__)
        for line in notes:
            log.info(line)
        log.info(f"selected {describe(series)}")
        selected = StudySelectedSeries(study)
        selected.add_selected_series(SelectedSeries(SELECTION_NAME, series))
        op_output.emit([selected], self.output_name_selected_series)
