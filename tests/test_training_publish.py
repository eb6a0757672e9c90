"""Training publishes all region models of a run at once, or nothing: SIGKILL at random points changes nothing.

A real server (demo weights, CPU) with one abdomen and one knee phantom labeled: a fine-tuning run
trains two region models (multi-model run, 1 epoch of 1 iteration). First a complete run through
``POST /train/`` switches both models to one new version; its train stats list the fault points it
passed. Then the training command MONAI Label itself runs (``python -m monailabel.interfaces.utils.app
-m train``) is started 3 times with ``MRANNOTATOR_TRAIN_KILL_AT`` at a random one of those points
(seeded, printed): each run SIGKILLs itself, and the server keeps serving the previous version with
identical labels; the run's temp dir (its TMPDIR, standing in for /tmp) holds nothing; the next start
of the app removes the killed run's work folder. A last complete run switches both models again.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import APP_DIR, start_server, stop_server

pytestmark = pytest.mark.timeout(1500)

TRAIN = {"max_epochs": 1, "iterations": 1, "val_iterations": 1}
CONF = {"epochs": "1", "iterations": "1", "val_iterations": "1", "threads": "1", "regions": "abdomen,knee"}
KILLS = 3  # seeded random points of the run; every CI run draws others (MRANNOTATOR_FAULT_SEED replays one)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("publish")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name, region, seed in (("abdomen_a", "abdomen", 41), ("knee_a", "knee", 42)):
        ph = make_phantom(region, seed=seed)
        nib.save(ph.image, studies / f"{name}.nii.gz")
        nib.save(ph.labels, studies / "labels" / "final" / f"{name}.nii.gz")
    srv = start_server(root, studies, demo_weights, conf=CONF)
    srv.studies, srv.model_dir, srv.weights = studies, root / "model", demo_weights
    yield srv
    stop_server(srv)


def _infer(server, image: str) -> tuple[np.ndarray, dict]:
    """The label volume and the result's parameters (multipart: params JSON + the label file)."""
    from requests_toolbelt.multipart import decoder

    r = requests.post(f"{server.url}/infer/mrannotator", params={"image": image}, timeout=300)
    assert r.status_code == 200, r.text
    parts = decoder.MultipartDecoder.from_response(r).parts
    params = json.loads(next(p.text for p in parts if b"params" in p.headers[b"Content-Disposition"]))
    blob = next(p.content for p in parts if b"image" in p.headers[b"Content-Disposition"])
    img = nib.Nifti1Image.from_bytes(gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob)
    return np.asanyarray(img.dataobj), params


def _served(server) -> dict:
    """Labels of both phantoms and the model version and checkpoints that made them."""
    out = {}
    for image in ("abdomen_a", "knee_a"):
        labels, params = _infer(server, image)
        out[image] = (labels, params["model_version"], {k: v["checkpoint"] for k, v in params["checkpoints"].items()})
    return out


def _train_via_server(server) -> dict:
    r = requests.post(f"{server.url}/train/mrannotator", json=TRAIN, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while True:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        assert time.time() < deadline, task
        time.sleep(2)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    return requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["mrannotator"]


def _killed_run(server, kill_at: int, tmpdir: Path) -> subprocess.CompletedProcess:
    """The command MONAI Label runs for POST /train/, with the fault hook and a private TMPDIR."""
    env = {**os.environ, "MONAI_LABEL_APP_DIR": str(APP_DIR), "MONAI_LABEL_STUDIES": str(server.studies),
           "MONAI_LABEL_APP_CONF": json.dumps({"weights": str(server.weights), "device": "cpu",
                                               "model_dir": str(server.model_dir), **CONF}),
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(APP_DIR)]),
           "MRANNOTATOR_TRAIN_KILL_AT": str(kill_at), "TMPDIR": str(tmpdir), "nnUNet_n_proc_DA": "0"}
    request = {"model": "mrannotator", **TRAIN}
    return subprocess.run([sys.executable, "-m", "monailabel.interfaces.utils.app", "-m", "train", "-r",
                            json.dumps(request)], env=env, capture_output=True, text=True, timeout=600)


def _assert_all_switched(before: dict, after: dict, version: str, trained: set[str], model_dir: Path) -> None:
    """Every model the run trained is served from the new version; the other models are served as before."""
    for image in before:
        assert after[image][1] == version
        for dataset, checkpoint in after[image][2].items():
            if dataset in trained:
                assert f"versions/{version}/" in checkpoint, (dataset, checkpoint)
                assert checkpoint != before[image][2][dataset]
            else:
                assert checkpoint == before[image][2][dataset]
    assert os.readlink(model_dir / "current") == f"versions/{version}"


def test_runs_publish_all_models_at_once_and_killed_runs_publish_nothing(server, tmp_path):
    pretrained = _served(server)
    assert {v[1] for v in pretrained.values()} == {"pretrained"}

    stats = _train_via_server(server)  # complete run 1, through the server
    assert set(stats["models"]) == {"Dataset001_Abdomen", "Dataset002_ShoulderKnee"}  # multi-model run
    v1 = stats["version"]
    served_v1 = _served(server)
    _assert_all_switched(pretrained, served_v1, v1, set(stats["models"]), server.model_dir)
    points = stats["fault_points"]
    print(f"fault points of a complete run ({len(points)}): {points}")
    assert len(points) >= KILLS

    seed = int(os.environ.get("MRANNOTATOR_FAULT_SEED", time.time_ns() % 10_000))
    kills = sorted(random.Random(seed).sample(range(1, len(points) + 1), KILLS))
    print(f"seed {seed}: killing runs at points {[(k, points[k - 1]) for k in kills]}")
    previous_work = None
    for k in kills:
        tmpdir = tmp_path / f"tmp_{k}"
        tmpdir.mkdir()
        run = _killed_run(server, k, tmpdir)
        assert run.returncode == -signal.SIGKILL, (k, points[k - 1], (run.stdout + run.stderr)[-3000:])
        assert f"killing this training process at {points[k - 1]!r}" in run.stdout + run.stderr
        now = _served(server)
        for image in now:  # the previous version keeps serving, with identical labels
            assert now[image][1] == v1 and now[image][2] == served_v1[image][2], (k, points[k - 1])
            np.testing.assert_array_equal(now[image][0], served_v1[image][0])
        assert os.readlink(server.model_dir / "current") == f"versions/{v1}"
        # nothing in its /tmp (torch makes its empty inductor cache folder there when nnU-Net is imported)
        assert not [p for p in tmpdir.rglob("*") if not p.is_dir()], (k, list(tmpdir.rglob("*")))
        work = list((server.model_dir / ".work").glob("run-*"))
        assert len(work) <= 1, work  # this run's; the one before was removed when this run's app started
        if previous_work is not None:
            assert not previous_work.exists()
        previous_work = work[0] if work else None
        shutil.rmtree(tmpdir)

    stats = _train_via_server(server)  # complete run 2: also removes what the last killed run left
    v2 = stats["version"]
    assert v2 != v1
    _assert_all_switched(served_v1, _served(server), v2, set(stats["models"]), server.model_dir)
    assert previous_work is None or not previous_work.exists()
    assert not list((server.model_dir / ".work").glob("run-*"))
    assert not list((server.model_dir / "versions").glob(".staging-*"))
    assert {p.name for p in (server.model_dir / "versions").iterdir()} <= {v1, v2}  # no unswitched version
