"""Results as 3D Slicer's MONAI Label module imports them, through a real server with two region models.

The module (0.8.5 and current) sorts a result's ``label_names`` by id, drops ``background`` and passes the
names to ``ImportLabelmapToSegmentationNode``, which gives the i-th name the voxels of value i + 1 and skips
names that have no segment (segments are made from /info's ``labels`` when the image loads). Catalogue ids
are not 1..N (abdomen 1-8, knee 11-14), so this checks every structure's voxels land in its own segment for
the merged segmentation, one region model's segmentation and a click correction.
"""

from __future__ import annotations

import tempfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mrannotator.catalogue import load_catalogue
from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]
CAT = load_catalogue()
IMAGE = "knee"
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights):
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("slicer_labels")
    studies = root / "studies"
    studies.mkdir()
    ph = make_phantom("knee", seed=4242)
    nib.save(ph.image, studies / f"{IMAGE}.nii.gz")
    srv = start_server(root, studies, demo_weights, conf={"regions": "abdomen,knee"})
    client = MONAILabelClient(srv.url, tmpdir=tempfile.mkdtemp(dir=root))
    yield {"client": client, "info": client.info(), "truth": np.asarray(ph.labels.dataobj)}
    stop_server(srv)


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def _slicer_import(labels: np.ndarray, params: dict, segment_names) -> dict[str, np.ndarray]:
    """Each existing segment's mask after the module's ``updateSegmentationMask`` (3D, no freeze)."""
    names = [k for k, _ in sorted(params["label_names"].items(), key=lambda kv: kv[1])]
    names = [n for n in names if n != "background"]
    return {name: labels == i + 1 for i, name in enumerate(names) if name in segment_names}


def _check_each_structure_in_its_segment(server, path, params):
    labels = _read(path)
    segments = _slicer_import(labels, params, server["info"]["labels"])
    present = [s for s in CAT.structures if s.name in server["info"]["labels"] and (labels == s.id).any()]
    assert any(s.id > 8 for s in present), "the result should hold a knee structure (id above 8)"
    for s in present:
        assert s.name in segments, f"{s.name} is not imported into any segment"
        assert np.array_equal(segments[s.name], labels == s.id), f"{s.name} (id {s.id}) lands in another segment"


def test_merged_segmentation_lands_in_the_right_segments(server):
    path, params = server["client"].infer("mrannotator", IMAGE, dict(SLICER))
    _check_each_structure_in_its_segment(server, path, params)
    assert params["label_names"]["femur"] == CAT.get("femur").id  # ids stay catalogue ids


def test_one_region_model_lands_in_the_right_segments(server):
    path, params = server["client"].infer("mrannotator_shoulderknee", IMAGE, dict(SLICER))
    _check_each_structure_in_its_segment(server, path, params)


def test_click_correction_lands_in_the_right_segments(server):
    server["client"].infer("mrannotator", IMAGE, dict(SLICER))  # fills the probability cache
    truth = server["truth"]
    femur = np.argwhere(truth == CAT.get("femur").id)
    click = [int(v) for v in femur[len(femur) // 2]]
    params = {name: [] for name in server["info"]["labels"]}
    params.update({"femur": [click], "label": "femur", **SLICER})
    path, out = server["client"].infer("mrannotator_refine", IMAGE, params)
    _check_each_structure_in_its_segment(server, path, out)
