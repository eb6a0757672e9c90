"""Click correction in the OHIF viewer: ``POST /annotate/refine?image=SERIES`` (annotator).

The viewer's "Add point" / "Remove point" tools (ohif_extension/mrannotator.js) send, for the active segment:

    {"label": <the segment's name: a structure the served model segments>,
     "foreground": [{"instance": SOPInstanceUID, "row": r, "column": c}, ...],   # all clicks so far
     "background": [...],
     "segments": {index: name}, "frames": {uid: frame}}                          # the label as the viewer holds it

Points name an instance and a pixel of it, never a position: the server maps them to voxel indices of its
image (column, row, slice of that instance; lib/frame_labels.py), as it maps the frames. The correction is
the app's click task (``<model>_refine``, lib/infers/refine.py: the cached probabilities of the last infer and
the image) applied to the label the viewer sent, so brush edits made since the proposal stay. Answer: the
corrected label as frames in the viewer's own segment indices, and how many voxels changed. Bad input (a
point off the image or on another series, a label the model does not segment, no points, two segments of
one name): 400 naming it.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from fastapi import HTTPException, Request

from lib.errors import bad_request, not_found
from lib.frame_labels import frames_from_volume, relabel
from lib.infers.refine import VIEWER_LABELS
from mrannotator.errors import InputError

from .annotate import PREFIX, _app, _series, default_model, read_json, viewer_label
from .internals import app_datastore, tasks

MAX_POINTS = 200  # per kind and request: a human clicks far fewer


def points_to_voxels(points, series, kind: str) -> list[list[int]]:
    """``[{instance, row, column}]`` -> voxel indices [i, j, k] of the series' image (InputError naming a bad one)."""
    if not isinstance(points, list):
        raise InputError(f"{kind} must be a list of {{instance, row, column}} points")
    if len(points) > MAX_POINTS:
        raise InputError(f"{kind} has {len(points)} points; at most {MAX_POINTS} per request")
    index = {str(d.SOPInstanceUID): k for k, d in enumerate(series.datasets)}
    rows, columns = int(series.datasets[0].Rows), int(series.datasets[0].Columns)
    out = []
    for n, p in enumerate(points):
        if not isinstance(p, dict) or not {"instance", "row", "column"} <= p.keys():
            raise InputError(f"{kind} point {n} must be {{instance, row, column}}, got {str(p)[:80]}")
        if str(p["instance"]) not in index:
            raise InputError(f"{kind} point {n} is on instance {str(p['instance'])[:80]!r}, which is not in this "
                             "series: was another series open in the viewer?")
        try:
            row, column = int(p["row"]), int(p["column"])
        except (TypeError, ValueError):
            raise InputError(f"{kind} point {n}: row and column must be integers") from None
        if not (0 <= row < rows and 0 <= column < columns):
            raise InputError(f"{kind} point {n} (row {row}, column {column}) is off the image ({rows} x {columns})")
        out.append([column, row, index[str(p["instance"])]])
    return out


def refine_task(app, model: str) -> str:
    from monailabel.interfaces.tasks.infer_v2 import InferType

    infers = tasks(app, "infers")
    if f"{model}_refine" in infers:
        return f"{model}_refine"
    found = [name for name, task in infers.items() if task.type == InferType.DEEPEDIT]
    if not found:
        raise not_found("this server serves no click-correction task")
    return found[0]


def _refine(image: str, payload: dict) -> dict:
    app = _app()
    series = _series(app_datastore(app), image)
    label = payload.get("label")
    try:
        held, ids = viewer_label(series, payload)
        fg = points_to_voxels(payload.get("foreground", []), series, "foreground")
        bg = points_to_voxels(payload.get("background", []), series, "background")
    except InputError as e:
        raise bad_request(f"click correction of series {image} refused: {e}") from e
    if not fg and not bg:
        raise bad_request("no points: click inside the structure (Add point) or outside it (Remove point)")
    if len(set(ids.values())) != len(ids):
        raise bad_request("two segments carry the same structure name: rename or delete one, then click again")
    index_of = {v: int(k) for k, v in ids.items()}
    model = str(payload.get("model") or default_model(app))
    task = refine_task(app, model)
    result = app.infer({"model": task, "image": image, "label": label, "foreground": fg, "background": bg,
                        VIEWER_LABELS: held, "result_extension": ".nii.gz", "result_dtype": "uint16"})
    path = result.get("file") if isinstance(result, dict) else None
    if not path or not os.path.isfile(path):
        raise HTTPException(status_code=500, detail=f"{task} gave no label for series {image}")
    try:
        new = np.rint(np.asanyarray(nib.load(path).dataobj)).astype(np.int32)
    finally:
        os.unlink(path)
    try:  # back to the viewer's segment indices: every structure present must be one the viewer names
        out = relabel(new, {str(sid): idx for sid, idx in index_of.items()})
    except InputError as e:
        raise bad_request(f"the corrected label holds a structure no segment of the viewer names ({e}); label "
                          f"{label!r}: add a segment of that name first") from e
    return {"series": image, "model": model, "task": task, "label": label,
            "changed": int((new != held).sum()), "frames": frames_from_volume(out, [str(d.SOPInstanceUID)
                                                                              for d in series.datasets])}


async def refine(request: Request, image: str = ""):
    from starlette.concurrency import run_in_threadpool

    payload = await read_json(request, "{label, foreground, background, segments, frames}")
    return await run_in_threadpool(_refine, image, payload)


def install(app) -> None:
    """Add the route to the FastAPI ``app`` (ahead of MONAI Label's own)."""
    from fastapi import Security
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import get_current_user

    app.router.routes[0:0] = [
        APIRoute(f"{settings.MONAI_LABEL_API_STR}{PREFIX}/refine", refine, methods=["POST"],
                 summary="OHIF: correct one structure by clicks (points on instances, all clicks so far)",
                 dependencies=[Security(get_current_user)]),
    ]
