"""Writers at the end of the graph: the DICOM SEG, and the labels NIfTI + per-structure statistics JSON.

Every file is written through a temporary name and renamed, so an output folder never holds a partial file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.operators.dicom_utils import ModelInfo

from mrannotator.dicom import make_seg
from mrannotator.imageio import save_json, save_nifti, write_atomic

SEG_FILE = "mrannotator_seg.dcm"
LABELS_FILE = "mrannotator_labels.nii.gz"
STATISTICS_FILE = "mrannotator_structures.json"


class _SegmentationSink(Operator):
    """An end of the graph: takes the segmentation, writes into ``output_folder``."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("segmentation")


class DICOMSegWriterOperator(_SegmentationSink):
    """segmentation -> OUT/mrannotator_seg.dcm (BINARY SEG, empty frames omitted, ModelInfo filled)."""

    def compute(self, op_input, op_output, context):
        s = op_input.receive("segmentation")
        info: ModelInfo = s.model_info
        if not s.result.structures:
            logging.getLogger(__name__).warning("no structure found: no DICOM SEG written (a SEG needs a segment)")
            return
        seg = make_seg(
            s.result.labels, s.result.structures, s.source_datasets, weights=s.result.weights,
            model_creator=info.creator, model_name=info.name, model_version=info.version, device_uid=info.uid,
            source_affine=s.volume.affine,  # the selector sorted the series once; the SEG writer does not again
        )
        write_atomic(self.output_folder / SEG_FILE, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
        logging.getLogger(__name__).info(
            f"DICOM SEG {seg.SOPInstanceUID}: {len(s.result.structures)} segments, {seg.NumberOfFrames} frames "
            f"-> {self.output_folder / SEG_FILE}"
        )


class ResultsWriterOperator(_SegmentationSink):
    """segmentation -> OUT/mrannotator_labels.nii.gz and OUT/mrannotator_structures.json."""

    def compute(self, op_input, op_output, context):
        s = op_input.receive("segmentation")
        report = {
            "study_instance_uid": s.study_instance_uid,
            "series_instance_uid": s.series_instance_uid,
            "series_description": s.series_description,
            **s.result.summary(),
        }
        save_nifti(s.result.labels, self.output_folder / LABELS_FILE)
        save_json(report, self.output_folder / STATISTICS_FILE)
        logging.getLogger(__name__).info(f"labels and statistics -> {self.output_folder}")
