"""MRAnnotator segmentation: the selected series' volume, with its exact DICOM geometry, through the engine.

The engine (``mrannotator.Segmenter``) is loaded once per run, when the first volume arrives (a study
without a usable series fails before any model is read), and reused for every later volume. The volume
comes from ``mrannotator.dicom`` (affine from the instances' own ImagePositionPatient /
ImageOrientationPatient / PixelSpacing, never the affine diagonal), so sagittal, coronal, oblique and
reversed-order series are segmented in the right anatomical frame, exactly as the CLI segments them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.operators.dicom_utils import ModelInfo

from mrannotator import Segmentation, Segmenter, __version__
from mrannotator.audit import RunAudit
from mrannotator.dicom.results import audit_weights, checkpoint_digests, model_identity


@dataclass
class SeriesSegmentation:
    """What the writers need: the engine's result and the source instances in slice order."""

    result: Segmentation
    volume: nib.Nifti1Image
    source_datasets: list  # pydicom Datasets (headers), slice k of ``volume`` = source_datasets[k]
    study_instance_uid: str
    series_instance_uid: str
    series_description: str
    model_info: ModelInfo  # filled: creator, name (with the weights), version, Device UID of the weights


def model_info_for(segmenter: Segmenter, digests: dict[str, str] | None = None) -> ModelInfo:
    """IHE AI Results model identity (the CLI's too: ``mrannotator.dicom.results.model_identity``)."""
    m = model_identity(segmenter, digests)
    return ModelInfo(creator=m.creator, name=m.name, version=m.version, uid=m.device_uid)


class MRAnnotatorSegmentationOperator(Operator):
    """volume (SeriesVolume) -> segmentation (SeriesSegmentation)."""

    def __init__(self, fragment: Fragment, *args, weights, device: str = "auto", mode: str = "exact",
                 audit: RunAudit | None = None, **kwargs):
        self.weights = weights
        self.audit = audit
        self.device = device
        self.mode = mode  # "exact" (labels as stock nnU-Net) or "fast" (bf16 / fp16 autocast)
        self.segmenter: Segmenter | None = None
        self.model_info: ModelInfo | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("volume")
        spec.output("segmentation")

    def _load(self):
        import mrannotator

        log = logging.getLogger(__name__)
        log.info(f"engine: mrannotator {__version__} from {Path(mrannotator.__file__).parent}")
        self.segmenter = Segmenter(weights=self.weights, device=self.device, mode=self.mode)
        self.digests = checkpoint_digests(self.segmenter)
        self.model_info = model_info_for(self.segmenter, self.digests)
        w = self.segmenter.weights
        log.info(f"weights: {w.source} ({w.root}); models: {', '.join(m.dataset for m in self.segmenter.models)}; "
                 f"device {self.segmenter.device}")

    def _audit_model(self, first, load_seconds: float) -> None:
        if self.audit is None:
            return
        self.audit.source(first, self.audit.record["input"].get("path"))
        info = self.model_info
        self.audit.model(name=info.name, version=info.version, device_uid=info.uid,
                         weights=audit_weights(self.segmenter, self.digests))
        self.audit.timed("load_models", load_seconds)

    def compute(self, op_input, op_output, context):
        log = logging.getLogger(__name__)
        received = op_input.receive("volume")
        volume, datasets = received.image, received.series.datasets  # slice k of volume = datasets[k]
        first = datasets[0]
        t0 = time.perf_counter()
        if self.segmenter is None:
            self._load()
        self._audit_model(first, time.perf_counter() - t0)
        result = self.segmenter.segment(volume, progress=log.info)
        log.info(f"{len(result.structures)} structures found in {result.seconds:.1f} s")
        if self.audit is not None:
            self.audit.timed("segment", result.seconds)
        op_output.emit(
            SeriesSegmentation(
                result=result,
                volume=volume,
                source_datasets=datasets,
                study_instance_uid=str(first.StudyInstanceUID),
                series_instance_uid=str(first.SeriesInstanceUID),
                series_description=str(getattr(first, "SeriesDescription", "") or ""),
                model_info=self.model_info,
            ),
            "segmentation",
        )
