"""Click and scribble correction through a real MONAI Label server, called as 3D Slicer's module (0.8.5) calls it.

SmartEdit (deepedit, multi-label): ``infer(model, image_id, {"label": <segment>, <each /info label>: [its
foreground points], ..., result_extension/result_dtype from the task's config})`` with points as voxel indices
i, j, k; the result is the whole label map, read back by ``label_names``. Scribbles: the label file of all
segments (values 1..N in segment order), ``label_info`` naming them and ``selected_label_name``; Slicer imports
value 1 of the result into that segment. One server for the module (abdomen model only, CPU).
"""

from __future__ import annotations

import tempfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from server_support import client_status, start_server, stop_server

from mrannotator.catalogue import load_catalogue
from mrannotator.orientation import voxel_spacing
from mrannotator.sites import make_site_phantom

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]
CAT = load_catalogue()
IMAGE = "abdomen_t1"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights):
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("refine_server")
    studies = root / "studies"
    studies.mkdir()
    ph = make_site_phantom("abdomen", seed=31337, site="t1")  # a contrast the demo model never saw: poor start
    nib.save(ph.image, studies / f"{IMAGE}.nii.gz")
    srv = start_server(root, studies, demo_weights, conf={"regions": "abdomen"})
    client = MONAILabelClient(srv.url, tmpdir=tempfile.mkdtemp(dir=root))
    info = client.info()
    path, params = client.infer("mrannotator", IMAGE, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    yield {"client": client, "info": info, "root": root, "truth": np.asarray(ph.labels.dataobj),
           "spacing": voxel_spacing(ph.image.affine), "first": _read(path), "state": {"labels": _read(path)}}
    stop_server(srv)


def _read(path) -> np.ndarray:
    """A result file as an (i, j, k) array, as Slicer's ``sitk.ReadImage`` + PushVolumeToSlicer reads it."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def _deepest(mask, spacing):
    lab, n = ndimage.label(mask)
    assert n, "no error region"
    comp = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    dt = ndimage.distance_transform_edt(np.pad(comp, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return [int(v) for v in np.unravel_index(np.argmax(dt), dt.shape)]


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def _smartedit(server, label, points_by_label):
    """The params SmartEdit's multi-label branch builds: one key per /info label, then label and task config."""
    params = {name: points_by_label.get(name, []) for name in server["info"]["labels"]}
    params["label"] = label
    config = server["info"]["models"]["mrannotator_refine"]["config"]
    params.update({k: v[0] if isinstance(v, list) else v for k, v in config.items()})
    params["result_extension"] = ".nrrd"  # what the plugin writes and reads
    return params


def _only_structure_moved(old, new, sid):
    changed = old != new
    assert changed.any()
    assert np.all((old[changed] == sid) | (new[changed] == sid)), "a voxel moved between two other structures"


def test_tasks_are_listed_with_the_types_slicer_looks_for(server):
    models = server["info"]["models"]
    assert models["mrannotator_refine"]["type"] == "deepedit"
    assert models["mrannotator_scribbles"]["type"] == "scribbles"
    assert "kidney_right" in models["mrannotator_refine"]["labels"]
    assert "background" in server["info"]["labels"]  # SmartEdit sends the 'background' segment's points


def test_click_adds_a_missed_region(server):
    truth, old = server["truth"], server["state"]["labels"]
    sid = CAT.get("kidney_right").id
    click = _deepest((truth == sid) & (old != sid), server["spacing"])
    path, params = server["client"].infer("mrannotator_refine", IMAGE, _smartedit(server, "kidney_right",
                                                                                  {"kidney_right": [click]}))
    new = _read(path)
    assert params["probabilities_cached"] is True and params["label_names"]["kidney_right"] == sid
    assert _dice(new == sid, truth == sid) > _dice(old == sid, truth == sid) + 0.5
    _only_structure_moved(old, new, sid)
    server["state"]["labels"] = new


def test_background_click_removes_a_false_region(server):
    truth, old = server["truth"], server["state"]["labels"]
    sid = CAT.get("spleen").id
    false = (old == sid) & (truth != sid)
    assert false.sum() > 200, "the demo model should label a false spleen on this contrast"
    click = _deepest(false, server["spacing"])
    path, _ = server["client"].infer("mrannotator_refine", IMAGE, _smartedit(server, "spleen", {"background": [click]}))
    new = _read(path)
    assert ((new == sid) & (truth != sid)).sum() < 0.3 * false.sum()
    _only_structure_moved(old, new, sid)
    kidney = CAT.get("kidney_right").id
    assert np.array_equal(new == kidney, old == kidney), "the earlier kidney correction was lost"
    server["state"]["labels"] = new


def test_scribbles_as_slicer_sends_them(server):
    truth, old = server["truth"], server["state"]["labels"]
    sid = CAT.get("kidney_left").id
    c = _deepest((truth == sid) & (old != sid), server["spacing"])
    # Slicer exports every segment of the node, numbered 1..N in segment order, named by label_info
    segments = np.zeros(old.shape, np.uint8)
    segments[old == sid] = 1
    segments[c[0] - 1:c[0] + 2, c[1], c[2]] = 3
    far = _deepest(truth == 0, server["spacing"])
    segments[far[0], far[1], far[2]] = 2
    label_in = server["root"] / "scribbles.nii.gz"
    img = nib.load(next((server["root"] / "studies").glob(f"{IMAGE}.nii.gz")))
    nib.save(nib.Nifti1Image(segments, img.affine), label_in)
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "roi": [], "selected_label_name": "kidney_left",
              "label_info": [{"name": "kidney_left", "id": 1}, {"name": "background_scribbles", "id": 2},
                             {"name": "foreground_scribbles", "id": 3}]}
    path, out = server["client"].infer("mrannotator_scribbles", IMAGE, params, label_in=str(label_in))
    mask = _read(path)
    assert set(np.unique(mask).tolist()) <= {0, 1} and out["label_names"] == {"kidney_left": 1}
    assert _dice(mask == 1, truth == sid) > _dice(old == sid, truth == sid) + 0.3


@pytest.mark.parametrize("label, points, status, message", [
    ("kidney_right", {"kidney_right": [[999, 5, 5]]}, 400, "outside the image"),
    ("kidney_right", {"background": [[-1, 5, 5]]}, 400, "outside the image"),
    ("brain", {"brain": [[5, 5, 5]]}, 400, "unknown label 'brain'"),
    ("kidney_right", {}, 400, "nothing to correct"),
    ("kidney_right", {"kidney_right": [[5, 5]]}, 400, "not three voxel indices"),
])
def test_bad_points_get_4xx_with_a_message(server, label, points, status, message):
    params = _smartedit(server, label, points)
    params.update(points)
    code, text = client_status(server["client"].infer, "mrannotator_refine", IMAGE, params)
    assert code == status and message in text, text


def test_scribbles_without_a_scribble_file_or_names_get_4xx(server):
    code, text = client_status(server["client"].infer, "mrannotator_scribbles", IMAGE,
                               {"selected_label_name": "kidney_left"})
    assert code == 400 and "scribbles label file" in text, text
    code, text = client_status(server["client"].infer, "mrannotator_scribbles", IMAGE,
                               {"selected_label_name": "liverish"})
    assert code == 400 and "unknown label 'liverish'" in text, text
