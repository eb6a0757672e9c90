"""The MONAI Label workflow of the OHIF viewer at /viewer/ (``ohif_extension/mrannotator.js``), in the server's terms.

Four routes, each a thin wrapper around what MONAI Label already does, so that the browser never has to
know the server's image grid (see :mod:`lib.frame_labels` for why frames are keyed by SOPInstanceUID):

- ``POST /annotate/next/{strategy}`` (annotator): the app's ``next_sample`` (the active-learning strategy);
  answers ``{series, study}`` for the viewer to open.
- ``POST /annotate/infer?image=SERIES[&model=NAME]`` (annotator): the app's ``infer`` on a datastore series
  (the proposal is kept for the mirror check as for ``/infer``); answers the label as frames keyed by
  SOPInstanceUID plus one segment per structure present, with the catalogue's name, colour and codes.
- ``PUT /annotate/label?image=SERIES`` (annotator), JSON ``{"segments": {index: name}, "frames": {uid:
  frame}}``: the frames become a label volume on the series' image grid, segment names become catalogue
  ids, and the datastore's ``save_label`` makes it the series' final label (the mirror check, then the
  project's SEG writer), then the app's ``on_save_label``. A name not in the catalogue, a frame of another
  series or of the wrong size: 400 naming it; a mirrored label: 409 with the reason (lib/label_guard.py).
- ``POST /annotate/refine?image=SERIES`` (annotator): click correction of one structure on the label as the
  viewer holds it; its own module, lib/monailabel_adapter/annotate_refine.py, built on these helpers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import nibabel as nib
import numpy as np
from fastapi import HTTPException, Request

from lib.errors import bad_request, not_found
from lib.frame_labels import frames_from_volume, relabel, volume_from_frames
from mrannotator.catalogue import load_catalogue
from mrannotator.errors import InputError

from .internals import app_datastore, tasks

logger = logging.getLogger(__name__)

PREFIX = "/annotate"
MAX_BODY = 128 * 1024 * 1024  # a label's frames, zlib-compressed and base64: a few MB for a 512 x 512 x 300 series


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _series(datastore, image: str):
    """The cached series of a datastore image (DICOMweb datastore only: frames are DICOM instances)."""
    if not hasattr(datastore, "_cached_series"):
        raise bad_request("the OHIF workflow needs the DICOMweb datastore (studies in the PACS); this server "
                          "serves a local datastore: use 3D Slicer, or start it with a DICOMweb studies URL")
    if not image:
        raise bad_request("image must be the SeriesInstanceUID of the series open in the viewer")
    datastore.require_image(image)  # 404 for a series the datastore does not list, 503 PACS down
    return datastore._cached_series(image)


def _segment(value: int, catalogue) -> dict:
    try:
        s = catalogue.by_id(value)
    except KeyError:
        return {"value": value, "name": f"label {value}", "color": [128, 128, 128], "catalogued": False}
    return {"value": value, "name": s.name, "display": s.display, "color": list(s.color),
            "type": s.type.__dict__, "laterality": s.laterality.__dict__ if s.laterality else None}


def default_model(app) -> str:
    from monailabel.interfaces.tasks.infer_v2 import InferType

    for name, task in tasks(app, "infers").items():
        if task.type == InferType.SEGMENTATION:
            return name
    raise not_found("this server serves no segmentation model")


def next_study(strategy: str):
    app = _app()
    result = app.next_sample({"strategy": strategy, "client_id": "ohif"})
    if not result or not result.get("id"):
        raise not_found(f"strategy {strategy!r} has no series left to hand out (every series is labelled?)")
    series = str(result["id"])
    study = app_datastore(app).require_image(series)
    return {"series": series, "study": study, "strategy": strategy}


def run_model(image: str = "", model: str = ""):
    app = _app()
    series = _series(app_datastore(app), image)
    model = model or default_model(app)
    result = app.infer({"model": model, "image": image})
    path = result.get("file") if isinstance(result, dict) else None
    if not path or not os.path.isfile(path):
        raise HTTPException(status_code=500, detail=f"model {model!r} gave no label for series {image}")
    data = np.asanyarray(nib.load(path).dataobj)
    try:
        frames = frames_from_volume(np.rint(data).astype(np.int32), [str(d.SOPInstanceUID) for d in series.datasets])
    except InputError as e:
        raise HTTPException(status_code=500, detail=f"model {model!r} answered a label that does not fit series "
                                                    f"{image}: {e}") from e
    catalogue = load_catalogue()
    present = [int(v) for v in np.unique(data) if v]
    return {"series": image, "model": model, "rows": int(series.datasets[0].Rows),
            "columns": int(series.datasets[0].Columns), "frames": frames,
            "segments": [_segment(v, catalogue) for v in present]}


def _segment_ids(segments) -> dict[str, int]:
    if not isinstance(segments, dict) or not segments:
        raise InputError("segments must be a non-empty object of segment index -> catalogue structure name")
    catalogue = load_catalogue()
    out = {}
    for index, name in segments.items():
        structure = catalogue.find(name) if isinstance(name, str) else None
        if structure is None:
            raise InputError(f"segment {index} is named {str(name)[:80]!r}, which is not a structure of the label "
                             "catalogue: rename it to a catalogue name (e.g. "
                             f"{', '.join(s.name for s in list(catalogue)[:4])})")
        out[str(index)] = structure.id
    return out


async def read_json(request: Request, what: str) -> dict:
    """The request's JSON object body, counted as it arrives (413 past ``MAX_BODY``, 400 if not an object)."""
    too_large = HTTPException(status_code=413, detail=f"the label body is over {MAX_BODY} bytes")
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: never more than the cap in memory
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        payload = json.loads(body or b"null")
    except ValueError as e:
        raise bad_request(f"the body must be JSON {what}: {e}") from e
    if not isinstance(payload, dict):
        raise bad_request(f"the body must be a JSON object {what}")
    return payload


async def save_label(request: Request, image: str = ""):
    from starlette.concurrency import run_in_threadpool

    payload = await read_json(request, "{segments, frames}")
    return await run_in_threadpool(_save, image, payload)


def viewer_label(series, payload: dict) -> tuple[np.ndarray, dict[str, int]]:
    """The label volume (catalogue ids) the browser sent as ``{segments, frames}``, and segment index -> id."""
    first = series.datasets[0]
    ids = _segment_ids(payload.get("segments"))
    volume = volume_from_frames(payload.get("frames") or {}, [str(d.SOPInstanceUID) for d in series.datasets],
                                int(first.Rows), int(first.Columns))
    return relabel(volume, ids), ids


def _save(image: str, payload: dict) -> dict:
    app = _app()
    datastore = app_datastore(app)
    series = _series(datastore, image)
    try:
        label, _ = viewer_label(series, payload)
    except InputError as e:
        raise bad_request(f"label for series {image} refused: {e}") from e
    fd, path = tempfile.mkstemp(suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(label, series.affine), path)
        label_id = datastore.save_label(image, path, "final", {"client_id": "ohif", "source": "ohif-viewer"})
    finally:
        os.unlink(path)
    answer = app.on_save_label(image, label_id) or {}
    counts = {str(v): int((label == v).sum()) for v in np.unique(label) if v}
    logger.info(f"OHIF: final label of series {image} saved ({counts})")
    return {**answer, "image": image, "label": label_id, "voxels": counts}


def install(app) -> None:
    """Add the routes to the FastAPI ``app`` (ahead of MONAI Label's own)."""
    from fastapi import Security
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import get_current_user

    base = f"{settings.MONAI_LABEL_API_STR}{PREFIX}"
    token = [Security(get_current_user)]  # as MONAI Label's routes: the bearer token, declared in openapi.json
    app.router.routes[0:0] = [
        APIRoute(f"{base}/next/{{strategy}}", next_study, methods=["POST"], summary="OHIF: open the next series",
                 dependencies=token),
        APIRoute(f"{base}/infer", run_model, methods=["POST"], summary="OHIF: the model's proposal as frames",
                 dependencies=token),
        APIRoute(f"{base}/label", save_label, methods=["PUT"], summary="OHIF: save the corrected label as final",
                 dependencies=token),
    ]
