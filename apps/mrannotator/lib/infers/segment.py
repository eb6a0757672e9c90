"""Infer task: the engine's segmentation, written as the client asked (``result_extension``, ``result_dtype``)."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import SimpleITK as sitk
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.datastore import too_large
from lib.errors import bad_request, unprocessable
from lib.infers import cache
from lib.infers.labelnames import positional_label_names
from lib.service import ModelService, mean_entropy
from mrannotator.errors import InputError
from mrannotator.imageio import to_sitk
from mrannotator.limits import TooLargeError
from mrannotator.memory import MemoryBudgetError

logger = logging.getLogger(__name__)

# what the label file may be written as; 3D Slicer's plugin asks for .nrrd and uint8
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
RESULT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32,
                 "float32": np.float32}


class SegmentInfer(InferTask):
    """All served region models merged (``dataset`` None), or one region model."""

    def __init__(self, service: ModelService, dataset: str | None = None):
        self.service = service
        self.dataset = dataset
        seg = service.segmenter()
        if dataset is None:
            structures = seg.structures
            what = f"all regions merged ({', '.join(m.dataset for m in seg.models)})"
        else:
            model = next(m for m in seg.models if m.dataset == dataset)
            structures = sorted(model.structures.values(), key=lambda s: s.id)
            what = f"{dataset} only ({', '.join(model.folder.regions())})"
        self.structures = structures
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={s.name: s.id for s in structures},  # catalogue ids, as in the label volume
            dimension=3,
            description=f"MRAnnotator nnU-Net segmentation: {what}",
            config={"result_extension": ".nii.gz", "result_dtype": "uint8", "uncertainty": False},
        )

    def is_valid(self) -> bool:
        return True

    def info(self):
        info = super().info()
        info["structures"] = [s.as_dict() for s in self.structures]
        info["models"] = [m.folder.dataset for m in self.service.served()
                          if self.dataset in (None, m.folder.dataset)]
        return info

    def __call__(self, request):
        ext, dtype_name = result_format(request)
        uncertainty = str(request.get("uncertainty", False)).lower() in ("1", "true", "yes")

        t0 = time.perf_counter()
        try:
            result, served, model_version = self._segment(request, uncertainty)
        except TooLargeError as e:
            raise too_large(f"image {request.get('image_id', '')!r} cannot be segmented: {e}") from e
        except InputError as e:
            raise unprocessable(f"image {request.get('image_id', '')!r} cannot be segmented: {e}") from e
        t1 = time.perf_counter()
        path = write_result(result.labels, np.asanyarray(result.labels.dataobj), ext, dtype_name)
        t2 = time.perf_counter()

        params = {
            "label_names": positional_label_names({s.name: s.id for s in self.structures}),  # Slicer reads by position
            "structures": [s.as_dict() for s in result.structures],
            "models_run": result.models_run,
            "model_version": model_version,  # the published version that made this result
            "checkpoints": {m.folder.dataset: m.describe() for m in served if m.folder.dataset in result.models_run},
            "weights": result.weights,
            "result_extension": ext,
            "result_dtype": dtype_name,
            "latencies": {"infer": round(t1 - t0, 3), "write": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
        }
        if uncertainty and result.probabilities:
            params["entropy"] = round(mean_entropy(self.service.segmenter(), result), 6)
        return path, params

    def _segment(self, request, uncertainty: bool):
        """The segmentation, with probabilities kept for click correction (lib/infers/cache.py) when the
        cache is on; an image whose probabilities would not fit the memory budget is segmented without."""
        if not (uncertainty or cache.enabled()):
            return self.service.segment_versioned(request["image"], self.dataset)
        try:
            out = self.service.segment_versioned(request["image"], self.dataset, probabilities=True)
        except MemoryBudgetError:
            if uncertainty:
                raise
            return self.service.segment_versioned(request["image"], self.dataset)
        cache.remember(request, out[0], out[2])
        return out


def result_format(request) -> tuple[str, str]:
    """(file extension, dtype name) the client asked for (3D Slicer: .nrrd, uint8), checked."""
    ext = str(request.get("result_extension") or ".nii.gz").lower()
    if not ext.startswith("."):
        ext = "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise bad_request(f"result_extension {ext!r} is not supported; use one of {', '.join(RESULT_EXTENSIONS)}")
    dtype_name = str(request.get("result_dtype") or "uint8").lower()
    if dtype_name not in RESULT_DTYPES:
        raise bad_request(f"result_dtype {dtype_name!r} is not supported; use one of {', '.join(RESULT_DTYPES)}")
    return ext, dtype_name


def write_result(image, labels: np.ndarray, ext: str, dtype_name: str) -> str:
    """A label map on ``image``'s grid written to a new temporary file (MONAI Label sends and deletes it)."""
    fd, path = tempfile.mkstemp(suffix=ext, prefix="mrannotator-")
    os.close(fd)
    sitk.WriteImage(to_sitk(image, labels.astype(RESULT_DTYPES[dtype_name])), path, useCompression=True)
    return path
