"""The MONAI Label app, served for real: `monailabel start_server` on 127.0.0.1, driven by MONAILabelClient.

One server for the module (demo weights, CPU), a studies folder in a temp dir with the real MR
sample, abdominal phantoms and a corrupt NIfTI. Tests run in file order: the active-learning round
trip (which labels two images and fine-tunes) comes last.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mrannotator.catalogue import load_catalogue
from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import client_status, start_server, stop_server

pytestmark = pytest.mark.timeout(1200)

# Two abdominal phantoms the annotator corrects: a contrast the demo model never saw (intensities
# inverted, as between MR weightings), so its first prediction is poor and fine-tuning has something
# to learn. Their labels are the phantoms' own catalogue-id label volumes.
LABELED = ("abdomen_new_contrast_a", "abdomen_new_contrast_b")
UNLABELED_PHANTOMS = ("abdomen_plain",)
TRAIN_PARAMS = {"max_epochs": 2, "iterations": 6, "val_iterations": 1, "learning_rate": 0.01}


def _new_contrast(image: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asanyarray(image.dataobj).astype(np.int32)
    out = nib.Nifti1Image((data.max() - data).astype(np.int16), image.affine)
    out.set_qform(image.affine, code=1)
    out.set_sform(image.affine, code=1)
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory, real_mr):
    root = tmp_path_factory.mktemp("monailabel")
    st = root / "studies"
    st.mkdir()
    labels = root / "submitted"
    labels.mkdir()
    shutil.copy(real_mr, st / "real_mr.nii.gz")
    for i, name in enumerate(LABELED):
        ph = make_phantom("abdomen", seed=7000 + i, orientation="LPS")
        nib.save(_new_contrast(ph.image), st / f"{name}.nii.gz")
        nib.save(ph.labels, labels / f"{name}.nii.gz")
    nib.save(make_phantom("abdomen", seed=7100, orientation="LAS").image, st / "abdomen_plain.nii.gz")
    # a NIfTI cut short in the middle of its gzip stream
    (st / "corrupt.nii.gz").write_bytes((st / "abdomen_plain.nii.gz").read_bytes()[:4000])
    return {"root": root, "studies": st, "labels": labels}


@pytest.fixture(scope="module")
def server(studies, demo_weights):
    from monailabel.client import MONAILabelClient

    srv = start_server(studies["root"], studies["studies"], demo_weights)
    client = MONAILabelClient(srv.url, tmpdir=tempfile.mkdtemp(dir=studies["root"]))
    yield {"client": client, "port": srv.port, "model_dir": studies["root"] / "model", **studies}
    stop_server(srv)


_status_of = client_status


def _http(server, method, selector):
    from monailabel.client.client import MONAILabelUtils

    status, body, _, _ = MONAILabelUtils.http_method(method, f"http://127.0.0.1:{server['port']}", selector)
    return status, json.loads(body) if body else None


def _dice(truth: np.ndarray, pred: np.ndarray) -> float:
    ids = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    return float(np.mean([2 * np.sum((truth == i) & (pred == i)) / (np.sum(truth == i) + np.sum(pred == i))
                          for i in ids]))


def _expected_labels(demo_weights: Path) -> dict[str, dict[str, int]]:
    """Task name -> {catalogue name: catalogue id} read from the demo models' dataset.json files."""
    cat = load_catalogue()
    out: dict[str, dict[str, int]] = {"mrannotator": {}}
    for dj in sorted(demo_weights.glob("Dataset*/*/dataset.json")):
        names = [n for n, v in json.loads(dj.read_text())["labels"].items() if int(v)]
        task = "mrannotator_" + dj.parent.parent.name.split("_", 1)[1].lower()
        out[task] = {cat.get(n).name: cat.get(n).id for n in names}
        out["mrannotator"].update(out[task])
    return out


# ---------------------------------------------------------------------------------------------- info
def test_info_lists_models_with_catalogue_labels_trainer_strategies_scoring(server, demo_weights):
    info = server["client"].info()
    expected = _expected_labels(demo_weights)
    assert set(expected) <= set(info["models"])
    for task, labels in expected.items():
        assert info["models"][task]["labels"] == labels, task
        assert info["models"][task]["type"] == "segmentation"
    assert "mrannotator" in info["trainers"]
    assert {"random", "first", "uncertainty"} <= set(info["strategies"])
    assert "dice" in info["scoring"]
    assert Path(info["mrannotator"]["pretrained"]["root"]).resolve() == demo_weights.resolve()


# ---------------------------------------------------------------------------------------------- infer
def test_infer_real_mr_keeps_exact_geometry(server, real_mr):
    path, params = server["client"].infer("mrannotator", "real_mr", {})
    src, out = nib.load(real_mr), nib.load(path)
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    assert out.get_data_dtype() == np.uint8
    values = set(np.unique(np.asanyarray(out.dataobj)).tolist()) - {0}
    assert values <= set(server["client"].info()["models"]["mrannotator"]["labels"].values())
    assert params["models_run"] and params["checkpoints"]


def test_infer_as_slicer_asks_returns_valid_uint8_nrrd(server, real_mr):
    import nrrd

    path, params = server["client"].infer("mrannotator", "real_mr",
                                          {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert path.endswith(".nrrd") and params["result_extension"] == ".nrrd"
    data, header = nrrd.read(path)  # pynrrd: a real NRRD header and payload
    assert header["type"] in ("uint8", "unsigned char") and data.dtype == np.uint8
    ref, res = sitk.ReadImage(str(real_mr)), sitk.ReadImage(path)
    assert res.GetSize() == ref.GetSize()
    np.testing.assert_allclose(res.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(res.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(res.GetDirection(), ref.GetDirection(), atol=1e-6)
    nifti, _ = server["client"].infer("mrannotator", "real_mr", {})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(sitk.ReadImage(nifti)))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_4xx_with_message_and_nothing_is_stored(server):
    c, st = server["client"], server["studies"]
    def stored():  # request upload folders are transient (removed once each answer is out; tested elsewhere)
        return sorted(str(p.relative_to(server["root"])) for p in server["root"].rglob("*")
                      if "model" not in p.parts and "sessions" not in p.parts and p.suffix != ".log"
                      and not any(part.startswith("mrannotator-uploads-") for part in p.parts))

    before = stored()
    label = server["labels"] / f"{LABELED[0]}.nii.gz"

    status, msg = _status_of(c.infer, "mrannotator", "no_such_image", {})
    assert status == 404 and "no_such_image" in msg
    status, msg = _status_of(c.infer, "no_such_model", "real_mr", {})
    assert status == 404 and "no_such_model" in msg
    status, msg = _status_of(c.infer, "mrannotator", "/etc/passwd", {})  # no reading of server paths
    assert status == 404
    status, msg = _status_of(c.save_label, LABELED[0], str(st / "real_mr.nii.gz"), "final")  # wrong shape
    assert status == 422 and "shape" in msg
    status, msg = _status_of(c.save_label, LABELED[0], str(label), "../../escaped")
    assert status == 400 and "tag" in msg
    status, msg = _status_of(c.save_label, "no_such_image", str(label), "final")
    assert status == 404
    status, msg = _status_of(c.infer, "mrannotator", "corrupt", {})
    assert status == 422 and "corrupt" in msg
    status, msg = _status_of(c.save_label, "corrupt", str(label), "final")  # no label for an unreadable image
    assert status == 422 and "cannot be read" in msg

    changed = set(stored()) ^ set(before)
    assert not [p for p in changed if p.endswith((".nii.gz", ".nrrd", ".nii"))], changed
    assert not list(server["root"].parent.glob("escaped*")) and not list(server["root"].glob("escaped*"))
    ds = c.datastore()
    assert not ds["objects"][LABELED[0]]["labels"]
    assert c.info()["name"] == "MRAnnotator"  # still serving


# ---------------------------------------------------------------------------------------------- strategies
def test_random_strategy_never_fails_when_everything_was_just_handed_out(server):
    c = server["client"]
    unlabeled = {"real_mr", "corrupt", *LABELED, *UNLABELED_PHANTOMS}
    seen = [c.next_sample("random", {})["id"] for _ in range(3 * len(unlabeled))]
    assert set(seen) <= unlabeled


def test_first_strategy_gives_two_annotators_different_images(server):
    from monailabel.client import MONAILabelClient

    url = f"http://127.0.0.1:{server['port']}"
    annotator_a, annotator_b = (MONAILabelClient(url, client_id=who) for who in ("annotator-a", "annotator-b"))
    a = annotator_a.next_sample("first", {})["id"]
    b = annotator_b.next_sample("first", {})["id"]
    assert a != b
    assert annotator_a.next_sample("first", {})["id"] == a  # the same annotator asking again keeps their image


def test_uncertainty_strategy_returns_the_unlabeled_image_with_highest_entropy(server):
    c = server["client"]
    pick = c.next_sample("uncertainty", {})
    unlabeled = [i for i, o in c.datastore()["objects"].items() if not o["labels"].get("final")]
    assert pick["id"] in unlabeled
    entropies = {}
    for image in unlabeled:
        if image == "corrupt":
            continue
        _, params = c.infer("mrannotator", image, {"uncertainty": True, "result_extension": ".nii.gz"})
        entropies[image] = params["entropy"]
    assert pick["id"] == max(entropies, key=entropies.get), entropies
    assert pick["entropy"] == pytest.approx(entropies[pick["id"]], abs=1e-5)
    assert {r["id"] for r in pick["ranking"]} == set(entropies)  # the corrupt file is skipped, not fatal


# ---------------------------------------------------------------------------------------------- active learning
def test_active_learning_round_trip_fine_tunes_and_moves_prediction_toward_labels(server):
    c = server["client"]
    before = {}
    for name in LABELED:
        truth = np.asanyarray(nib.load(server["labels"] / f"{name}.nii.gz").dataobj)
        path, params = c.infer("mrannotator_abdomen", name, {})
        before[name] = (_dice(truth, np.asanyarray(nib.load(path).dataobj)), params["checkpoints"])
        c.save_label(name, str(server["labels"] / f"{name}.nii.gz"), "final")
    assert all(o["labels"].get("final") for i, o in c.datastore()["objects"].items() if i in LABELED)

    c.train_start("", {"mrannotator": TRAIN_PARAMS})  # POST /train/: every trainer
    deadline = time.time() + 600
    while True:
        task = c.train_status()
        if task["status"] in ("DONE", "ERROR", "STOPPED"):
            break
        assert time.time() < deadline, task
        time.sleep(3)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    assert any("val Dice" in line for line in task["details"])  # per-epoch validation Dice in GET /train/

    stats = c.info()["train_stats"]["mrannotator"]
    assert stats["status"] == "DONE"
    epochs = stats["models"]["Dataset001_Abdomen"]["epochs"]
    assert len(epochs) == TRAIN_PARAMS["max_epochs"] and all(e["val_mean_dice"] is not None for e in epochs)

    for name in LABELED:
        truth = np.asanyarray(nib.load(server["labels"] / f"{name}.nii.gz").dataobj)
        path, params = c.infer("mrannotator_abdomen", name, {})
        dice_after = _dice(truth, np.asanyarray(nib.load(path).dataobj))
        old, new = before[name][1]["Dataset001_Abdomen"], params["checkpoints"]["Dataset001_Abdomen"]
        assert new["finetuned"] and new["version"] != old["version"]
        assert str(server["model_dir"]) in new["checkpoint"]
        print(f"{name}: Dice before {before[name][0]:.3f}, after {dice_after:.3f}")
        assert dice_after > before[name][0] + 0.02, (name, before[name][0], dice_after)

    # multi-class Dice scoring, stored in the datastore's image info (run in the server process)
    status, result = _http(server, "POST", "/scoring/dice?run_sync=true")
    assert status == 200, result
    info = _http(server, "GET", f"/datastore/image/info?image={LABELED[0]}")[1]
    score = info["mrannotator_dice"]
    assert 0 < score["mean"] <= 1 and len(score["per_structure"]) >= 2


def _wait_train(c, timeout=300):
    deadline = time.time() + timeout
    while True:
        task = c.train_status()
        if task["status"] in ("DONE", "ERROR", "STOPPED"):
            return task
        assert time.time() < deadline, task
        time.sleep(2)


def test_failed_or_cancelled_training_keeps_the_served_checkpoint(server):
    c = server["client"]

    def served_version():
        _, params = c.infer("mrannotator_abdomen", LABELED[0], {})
        return params["checkpoints"]["Dataset001_Abdomen"]["version"]

    version = served_version()
    status, msg = _status_of(c.train_start, "mrannotator", {"learning_rate": -1})  # refused before queuing
    assert status == 400 and "learning_rate" in msg
    assert served_version() == version

    previous = c.info()["train_stats"]["mrannotator"]
    c.train_start("mrannotator", {"max_epochs": 50, "iterations": 50})
    deadline = time.time() + 180
    while True:  # wait until the fine-tuning itself runs, then cancel it
        stats = c.info()["train_stats"]["mrannotator"]
        if stats.get("status") == "RUNNING" and stats.get("pid") != previous.get("pid"):
            break
        assert time.time() < deadline, stats
        time.sleep(1)
    c.train_stop()
    assert _wait_train(c)["status"] == "STOPPED"
    deadline = time.time() + 30  # SIGKILL is delivered asynchronously; the process may take a moment to die
    while c.info()["train_stats"]["mrannotator"]["status"] != "STOPPED":
        assert time.time() < deadline, c.info()["train_stats"]["mrannotator"]
        time.sleep(1)
    assert served_version() == version
    assert not list(server["model_dir"].rglob(".checkpoint*"))  # no half-written checkpoint left behind
