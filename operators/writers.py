"""Writers at the end of the graph: the DICOM SEG + its TID 1500 volume report (SR), and the labels NIfTI +
per-structure statistics JSON.

Every file is written through a temporary name and renamed, so an output folder never holds a partial file.
Each writer records what it wrote, and how long it took, in the run's audit record.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.operators.dicom_utils import ModelInfo

from mrannotator.audit import RunAudit
from mrannotator.dicom.results import ModelIdentity, write_dicom_results
from mrannotator.imageio import save_json, save_nifti

SEG_FILE = "mrannotator_seg.dcm"
SR_FILE = "mrannotator_sr.dcm"
LABELS_FILE = "mrannotator_labels.nii.gz"
STATISTICS_FILE = "mrannotator_structures.json"


class _SegmentationSink(Operator):
    """An end of the graph: takes the segmentation, writes into ``output_folder``."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, audit: RunAudit, **kwargs):
        self.output_folder = Path(output_folder)
        self.audit = audit
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("segmentation")


class DICOMSegWriterOperator(_SegmentationSink):
    """segmentation -> OUT/mrannotator_seg.dcm (BINARY SEG, empty frames omitted, ModelInfo filled) and
    OUT/mrannotator_sr.dcm (TID 1500: each segment's volume and mean intensity); emits the files written.

    SeriesNumbers are chosen free in the source study as found in ``input_folder``.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs):
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        super().setup(spec)
        spec.output("dicom_files").condition(ConditionType.NONE)  # the DICOM sender is optional

    def compute(self, op_input, op_output, context):
        t0 = time.perf_counter()
        s = op_input.receive("segmentation")
        info: ModelInfo = s.model_info
        log = logging.getLogger(__name__)
        if not s.result.structures:
            log.warning("no structure found: no DICOM SEG or SR written (a SEG needs a segment)")
            return
        written = write_dicom_results(
            self.output_folder, s.result, s.volume, s.source_datasets, s.volume.affine, input_root=self.input_folder,
            model=ModelIdentity(info.creator, info.name, info.version, info.uid),
        )
        self.audit.outputs([{**w.as_dict(), "path": Path(w.path).name} for w in written])
        self.audit.timed("write_dicom", time.perf_counter() - t0)
        for w in written:
            log.info(f"DICOM {w.kind} {w.sop_instance_uid} (series {w.series_number}) -> {w.path}")
        op_output.emit([w.path for w in written], "dicom_files")


class ResultsWriterOperator(_SegmentationSink):
    """segmentation -> OUT/mrannotator_labels.nii.gz and OUT/mrannotator_structures.json."""

    def compute(self, op_input, op_output, context):
        t0 = time.perf_counter()
        s = op_input.receive("segmentation")
        report = {
            "study_instance_uid": s.study_instance_uid,
            "series_instance_uid": s.series_instance_uid,
            "series_description": s.series_description,
            **s.result.summary(),
        }
        save_nifti(s.result.labels, self.output_folder / LABELS_FILE)
        save_json(report, self.output_folder / STATISTICS_FILE)
        self.audit.outputs([{"kind": "labels", "path": LABELS_FILE}, {"kind": "statistics", "path": STATISTICS_FILE}])
        self.audit.timed("write_files", time.perf_counter() - t0)
        logging.getLogger(__name__).info(f"labels and statistics -> {self.output_folder}")
