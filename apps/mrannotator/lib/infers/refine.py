"""Click and scribble correction infer tasks, as 3D Slicer's MONAI Label module drives them (0.8.5 plugin).

- ``mrannotator_refine`` (type deepedit): SmartEdit's multi-label call sends ``{"label": <structure>,
  <structure>: [[i, j, k], ...] (foreground clicks), "background": [[i, j, k], ...], ...}`` (one key per
  label of /info, points as voxel indices of the image as stored). A DeepGrow-style
  ``{"label", "foreground", "background"}`` is accepted too. Result: the whole corrected label map with
  ``label_names`` (as the segment task returns it; every id 1..max named, lib/infers/labelnames.py), which
  Slicer reads by position.
- ``mrannotator_scribbles`` (type scribbles): the Scribbles section sends the label file of all its
  segments (values 1..N in segment order, named by ``label_info``), with ``foreground_scribbles`` and
  ``background_scribbles`` among them, and ``selected_label_name``, the structure to correct. Slicer
  imports value 1 of the result into that segment, so the result is that structure's corrected mask
  (1) unless ``"result": "all"`` asks for the whole label map.

The probabilities come from the last segment infer of that image with the served model version
(lib/infers/cache.py, filled by the segment task); if missing the models run once. Corrections build on the
cached current label map, so correcting one structure keeps the corrections of the others; OHIF's route
(lib/monailabel_adapter/annotate_refine.py) hands over the label map as the viewer holds it instead.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import bad_request, unprocessable
from lib.infers.cache import CACHE, image_key, remember
from lib.infers.labelnames import positional_label_names
from lib.infers.segment import result_format, write_result
from lib.service import ModelService
from mrannotator.errors import InputError
from mrannotator.imageio import load_image
from mrannotator.orientation import voxel_spacing
from mrannotator.refine import refine
from mrannotator.refine_shape import long_axis_of

VIEWER_LABELS = "viewer_labels"  # in-process only (lib/monailabel_adapter/annotate_refine.py): an ndarray


class _RefineBase(InferTask):
    def __init__(self, service: ModelService, type, description: str, extra_labels: dict | None = None):
        self.service = service
        self.structures = service.segmenter().structures
        super().__init__(type=type, labels={**(extra_labels or {}), **{s.name: s.id for s in self.structures}},
                         dimension=3, description=description,
                         config={"result_extension": ".nii.gz", "result_dtype": "uint8"})

    def is_valid(self) -> bool:
        return True

    def structure(self, name) -> int:
        by_name = {s.name: s.id for s in self.structures}
        if not isinstance(name, str) or name not in by_name:
            raise bad_request(f"unknown label {name!r}: this server corrects {', '.join(by_name)}")
        return by_name[name]

    def correct(self, request, sid: int, foreground, background, scribbles=None):
        """(image, corrected label map, model version, whether the probabilities came from the cache)."""
        try:
            img = load_image(request["image"])
        except InputError as e:
            raise unprocessable(f"image {image_key(request)!r} cannot be read: {e}") from e
        key, version = image_key(request), self.service.model_version()
        probs, labels = CACHE.get(key, version), CACHE.labels(key, version)
        cached = probs is not None and labels is not None and labels.shape == img.shape
        if not cached:
            try:
                result, _, version = self.service.segment_versioned(request["image"], None, probabilities=True)
            except InputError as e:
                raise unprocessable(f"image {key!r} cannot be segmented: {e}") from e
            remember(request, result, version)
            probs, labels = dict(result.probabilities or {}), np.asanyarray(result.labels.dataobj)
        held = request.get(VIEWER_LABELS)
        if held is not None:  # the label map as the viewer holds it (brush edits included): build on that
            if not isinstance(held, np.ndarray) or held.shape != img.shape:
                raise bad_request(f"{VIEWER_LABELS} must be a label volume of the image's shape {img.shape}")
            labels = held
        try:
            new = refine(np.asanyarray(img.dataobj), labels, probs.get(sid), sid, foreground, background,
                         scribbles, voxel_spacing(img.affine), long_axis_of(img.affine))
        except InputError as e:
            raise bad_request(f"cannot correct {request.get('label') or sid}: {e}") from e
        CACHE.set_labels(key, version, new)
        return img, new, version, cached

    def answer(self, request, img, labels, label_names: dict, version: str, cached: bool, seconds: dict):
        ext, dtype_name = result_format(request)
        path = write_result(img, labels, ext, dtype_name)
        return path, {"label_names": positional_label_names(label_names), "model_version": version,
                      "probabilities_cached": cached, "result_extension": ext, "result_dtype": dtype_name,
                      "latencies": seconds}


class RefineInfer(_RefineBase):
    """SmartEdit / DeepGrow-style points for one structure -> the whole corrected label map."""

    def __init__(self, service: ModelService):
        super().__init__(service, InferType.DEEPEDIT,
                         "MRAnnotator click correction: foreground/background points for one structure re-solve "
                         "it from the model's probabilities and the image (graph cut)", {"background": 0})

    def __call__(self, request):
        import time

        t0 = time.perf_counter()
        label = request.get("label")
        sid = self.structure(label)
        fg = request["foreground"] if "foreground" in request else request.get(label, [])
        bg = request.get("background", [])
        for kind, pts in (("foreground", fg), ("background", bg)):
            if not isinstance(pts, list | tuple):
                raise bad_request(f"{kind} points of {label!r} must be a list of [i, j, k] voxel indices")
        img, new, version, cached = self.correct(request, sid, fg, bg)
        names = {"background": 0, **{s.name: s.id for s in self.structures}}
        return self.answer(request, img, new, names, version, cached, {"total": round(time.perf_counter() - t0, 3)})


class ScribblesInfer(_RefineBase):
    """Slicer's Scribbles: foreground/background scribble segments for one structure -> its corrected mask."""

    def __init__(self, service: ModelService):
        super().__init__(service, InferType.SCRIBBLES,
                         "MRAnnotator scribble correction: foreground/background scribbles for one structure "
                         "re-solve it from the model's probabilities and the image (graph cut)")

    def __call__(self, request):
        import time

        t0 = time.perf_counter()
        label = request.get("selected_label_name") or request.get("label")
        sid = self.structure(label)
        if not request.get("label"):
            raise bad_request("scribbles infer needs the scribbles label file (the 'label' upload)")
        scribbles = self._scribbles(request)
        img, new, version, cached = self.correct(request, sid, [], [], scribbles)
        seconds = {"total": round(time.perf_counter() - t0, 3)}
        if str(request.get("result", "structure")) == "all":
            return self.answer(request, img, new, {s.name: s.id for s in self.structures}, version, cached, seconds)
        return self.answer(request, img, (new == sid).astype(np.uint8), {label: 1}, version, cached, seconds)

    @staticmethod
    def _scribbles(request) -> np.ndarray:
        """The scribble map (1 foreground, 2 background) from the uploaded label file and ``label_info``."""
        info = request.get("label_info") or [{"name": "background_scribbles", "id": 2},
                                             {"name": "foreground_scribbles", "id": 3}]
        try:
            ids = {str(x["name"]): int(x.get("id", x.get("idx"))) for x in info}
        except (TypeError, KeyError, ValueError):
            raise bad_request("label_info must be a list of {'name', 'id'}") from None
        if "foreground_scribbles" not in ids and "background_scribbles" not in ids:
            raise bad_request("label_info names no foreground_scribbles or background_scribbles segment")
        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(request["label"]))).transpose(2, 1, 0)
        except RuntimeError as e:
            raise unprocessable(f"the scribbles label file cannot be read: {e}") from e
        out = np.zeros(arr.shape, np.uint8)
        out[arr == ids.get("foreground_scribbles", -1)] = 1
        out[arr == ids.get("background_scribbles", -1)] = 2
        return out
