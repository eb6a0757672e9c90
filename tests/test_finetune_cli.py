"""``mrannotator finetune``: the server's fine-tune-and-publish loop without a server.

Four new-site (T1-like contrast) abdomen phantoms, labelled, fine-tune the demo abdomen model on a short
schedule (SCHEDULE: the app's learning rate, fewer steps); two held-out new-site phantoms measure the lift.
The same run on the app's default schedule (8 x 25) is the study ``bench/finetune_cli.py``. A second run
SIGKILLed after its first epoch leaves the published version current, and the next run's clean-up removes
what it left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from mrannotator.cli import main
from mrannotator.demo import dice_per_structure
from mrannotator.modelstore import ModelStore
from mrannotator.sites import make_site_phantom

pytestmark = [pytest.mark.study, pytest.mark.timeout(1800)]

TRAIN_SEEDS, HELDOUT_SEEDS = (41_001, 41_002, 41_003, 41_004), (41_101, 41_102)
SCHEDULE = ["--epochs", "3", "--iterations", "10"]  # 30 steps; the defaults are 200 (bench/finetune_cli.py)


def _mean_dice(segmenter, phantoms) -> float:
    values = []
    for ph in phantoms:
        pred = np.asarray(segmenter.segment(ph.image, regions=["abdomen"]).labels.dataobj)
        truth = np.asarray(ph.labels.dataobj)
        values += list(dice_per_structure(truth, pred, sorted(ph.structures)).values())
    return float(np.mean(values))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for sub in ("images", "labels"):
        (root / sub).mkdir()
    for seed in TRAIN_SEEDS:
        ph = make_site_phantom("abdomen", seed=seed, site="t1")
        nib.save(ph.image, root / "images" / f"case{seed}.nii.gz")
        nib.save(ph.labels, root / "labels" / f"case{seed}.nii.gz")
    return root


def test_finetune_lifts_new_site_dice_and_publishes_a_version(folders, demo_weights, capsys):
    from mrannotator import Segmenter
    from mrannotator.weights import load_weights

    heldout = [make_site_phantom("abdomen", seed=s, site="t1") for s in HELDOUT_SEEDS]
    before = _mean_dice(Segmenter(weights=demo_weights, device="cpu", regions=["abdomen"]), heldout)
    out = folders / "model"
    rc = main(["finetune", "--images", str(folders / "images"), "--labels", str(folders / "labels"),
               "--out", str(out), "--weights", str(demo_weights), "--regions", "abdomen", "--device", "cpu", *SCHEDULE])
    assert rc == 0
    store = ModelStore(out)
    version, folder = store.current()
    assert f"published {version}" in capsys.readouterr().out
    weights, served, _ = store.served_weights(load_weights(demo_weights))
    tuned = [m for m in served if m.finetuned]
    assert [m.folder.dataset for m in tuned] == ["Dataset001_Abdomen"] and tuned[0].model_version == version
    after = _mean_dice(Segmenter(weights=weights, device="cpu", regions=["abdomen"]), heldout)
    print(f"held-out new-site Dice: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.15 and after >= 0.6, (before, after)


def test_a_killed_run_leaves_the_published_version_current(folders, demo_weights):
    out = folders / "model"
    store = ModelStore(out)
    published = store.current()
    assert published is not None, "the first test publishes a version"
    cmd = [sys.executable, "-m", "mrannotator.cli", "finetune", "--images", str(folders / "images"),
           "--labels", str(folders / "labels"), "--out", str(out), "--weights", str(demo_weights),
           "--regions", "abdomen", "--device", "cpu", "--epochs", "3", "--iterations", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 900
    try:
        for line in proc.stdout:
            lines.append(line)
            if "epoch 1/3" in line or time.monotonic() > deadline:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert any("epoch 1/3" in line for line in lines), "".join(lines)[-3000:]
    assert store.current() == published  # the killed run switched nothing
    left = [*store.work_root.glob("run-*"), *store.versions.glob(".staging-*")]
    assert left, "the killed run's work and staging folders are there until a clean-up"
    removed = ModelStore(out).clean()
    assert set(left) <= set(removed) and not any(p.exists() for p in left)
    assert store.current() == published
