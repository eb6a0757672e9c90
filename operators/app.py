"""MRAnnotator MONAI Deploy application: a DICOM MR study in, a DICOM SEG (+ labels NIfTI, statistics JSON) out.

    python operators -i DICOM_DIR -o OUT [-m MODELS]
    HOLOSCAN_INPUT_PATH=... HOLOSCAN_OUTPUT_PATH=... HOLOSCAN_MODEL_PATH=... python operators

Without -m / HOLOSCAN_MODEL_PATH the demo weights (models/demo) are used. MRANNOTATOR_DEVICE picks
auto (default), cpu or cuda; MRANNOTATOR_MODE=fast opts into bf16 (CPU) / fp16 (CUDA) inference;
MRANNOTATOR_SERIES=UID segments that series (default: the largest acceptable MR series).

Outputs: mrannotator_seg.dcm (DICOM SEG), mrannotator_sr.dcm (TID 1500 volumes), labels NIfTI, statistics
JSON and mrannotator_audit.json (the run's audit record; also in $MRANNOTATOR_AUDIT_DIR when set). With
MRANNOTATOR_DICOM_DEST=AET@HOST:PORT (see mrannotator.dicom.store) the SEG and SR are sent by C-STORE.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dicom_sender import DICOMSenderOperator
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from mr_series_selector import MRSeriesLoaderOperator, MRSeriesSelectorOperator
from mrannotator_operator import MRAnnotatorSegmentationOperator
from writers import DICOMSegWriterOperator, ResultsWriterOperator

from mrannotator.audit import RunAudit
from mrannotator.dicom.store import destination_from_env, retry_settings
from mrannotator.weights import demo_weights_dir

VERSION = "0.1.0"


def models_path(app_context: AppContext, argv: list[str]) -> Path:
    """-m, else HOLOSCAN_MODEL_PATH, else the demo weights (the SDK's own default, ./models, is not ours)."""
    given = any(a in ("-m", "--model") or a.startswith("--model=") for a in argv[1:])
    if given or os.environ.get("HOLOSCAN_MODEL_PATH"):
        return Path(app_context.model_path)
    return demo_weights_dir()


class MRAnnotatorApp(Application):
    """MR series selector -> series loader -> MRAnnotator -> DICOM SEG + labels/statistics.

    The selector and the loader read DICOM through ``mrannotator.dicom``, the CLI's and the API's reader
    (MONAI Deploy's DICOM loader and series-to-volume operators would read it a second way).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.audit = RunAudit(tool="map")
        self.output_dir: Path | None = None

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        input_dir = Path(app_context.input_path)
        output_dir = Path(app_context.output_path)
        models = models_path(app_context, self.argv)
        self._logger.info(f"input {input_dir}, output {output_dir}, models {models}")
        self.output_dir = output_dir
        self.audit.record["input"] = {"path": str(input_dir)}
        destination = destination_from_env()  # a bad setting is refused here, before any work
        retries, delay = retry_settings()

        selector = MRSeriesSelectorOperator(self, CountCondition(self, 1), input_folder=input_dir,
                                            series_uid=os.environ.get("MRANNOTATOR_SERIES"), name="mr_series_selector")
        loader = MRSeriesLoaderOperator(self, name="mr_series_loader")
        segment = MRAnnotatorSegmentationOperator(
            self, weights=models, device=os.environ.get("MRANNOTATOR_DEVICE", "auto"),
            mode=os.environ.get("MRANNOTATOR_MODE", "exact"), audit=self.audit, name="mrannotator"
        )
        seg_writer = DICOMSegWriterOperator(self, output_folder=output_dir, input_folder=input_dir, audit=self.audit,
                                            name="dicom_seg_writer")
        results_writer = ResultsWriterOperator(self, output_folder=output_dir, audit=self.audit, name="results_writer")

        self.add_flow(selector, loader, {("series", "series")})
        self.add_flow(loader, segment, {("volume", "volume")})
        self.add_flow(segment, seg_writer, {("segmentation", "segmentation")})
        self.add_flow(segment, results_writer, {("segmentation", "segmentation")})
        if destination is not None:
            sender = DICOMSenderOperator(self, destination=destination, retries=retries, delay=delay,
                                         audit=self.audit, name="dicom_sender")
            self.add_flow(seg_writer, sender, {("dicom_files", "dicom_files")})
