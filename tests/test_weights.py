"""Weights: the official release drops in by path or by `weights install`, and broken ones are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mrannotator import weights as w
from mrannotator.errors import WeightsError

CLI = [sys.executable, "-m", "mrannotator.cli"]


def _release(demo_weights: Path, dest: Path, datasets=("Dataset001_Abdomen", "Dataset003_PelvisProstate")) -> Path:
    """A release-shaped folder (copied from the demo weights, which share the official layout)."""
    for ds in datasets:
        shutil.copytree(demo_weights / ds / w.FOLDER_NAME, dest / ds / w.FOLDER_NAME)
    return dest


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MRANNOTATOR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run(*args, env_home: Path):
    import os

    env = {**os.environ, "MRANNOTATOR_HOME": str(env_home)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_install_from_zip_records_checksums_and_becomes_the_default(demo_weights, tmp_path, home):
    rel = _release(demo_weights, tmp_path / "MRAnnotator_weights")
    z = tmp_path / "release.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in rel.rglob("*"):
            zf.write(f, f.relative_to(tmp_path))  # a top-level folder inside the zip, like real releases
    r = _run("weights", "install", str(z), env_home=home)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((home / "weights" / "official" / "manifest.json").read_text())
    assert manifest["models"] == ["Dataset001_Abdomen", "Dataset003_PelvisProstate"]
    assert all(len(v) == 64 for v in manifest["sha256"].values()) and len(manifest["sha256"]) == 6
    loaded = w.load_weights()
    assert loaded.source == "official" and not w.verify(loaded)
    listing = json.loads(_run("weights", "list", "--json", env_home=home).stdout)
    assert listing[0]["source"] == "official" and listing[0]["intact"] and listing[0]["active"]
    assert listing[1]["source"] == "demo" and not listing[1]["active"]
    # a tampered file is reported
    ck = next((home / "weights" / "official").rglob("checkpoint_final.pth"))
    ck.write_bytes(ck.read_bytes()[:-10] + b"0123456789")
    assert w.verify(w.load_weights())


def test_release_missing_a_checkpoint_is_refused_and_the_old_install_kept(demo_weights, tmp_path, home):
    good = _release(demo_weights, tmp_path / "good", datasets=("Dataset001_Abdomen",))
    assert _run("weights", "install", str(good), env_home=home).returncode == 0
    bad = _release(demo_weights, tmp_path / "bad")
    next(bad.glob("Dataset003_*/*/fold_0/checkpoint_final.pth")).unlink()
    r = _run("weights", "install", str(bad), env_home=home)
    assert r.returncode == 3 and "checkpoint missing" in r.stderr
    assert w.load_weights().describe()["models"] == ["Dataset001_Abdomen"]
    assert not list((home / "weights").glob(".install-*"))


def test_unknown_label_is_refused_unless_allowed(demo_weights, tmp_path, home):
    rel = _release(demo_weights, tmp_path / "rel", datasets=("Dataset003_PelvisProstate",))
    dj = next(rel.rglob("dataset.json"))
    d = json.loads(dj.read_text())
    d["labels"]["bladder_wall"] = 5
    dj.write_text(json.dumps(d))
    r = _run("weights", "install", str(rel), env_home=home)
    assert r.returncode == 3 and "bladder_wall" in r.stderr and "catalogue" in r.stderr
    assert not (home / "weights" / "official").exists()
    assert _run("weights", "install", str(rel), "--allow-unknown-labels", env_home=home).returncode == 0


@pytest.mark.parametrize("breakage", ["empty", "not_a_model", "corrupt_zip", "bad_json"])
def test_broken_weights_get_a_clear_message(breakage, demo_weights, tmp_path, home):
    target = tmp_path / "w"
    target.mkdir()
    expect = {"empty": "empty", "not_a_model": "no nnU-Net model", "corrupt_zip": "zip",
              "bad_json": "unreadable JSON"}[breakage]
    if breakage == "not_a_model":
        (target / "readme.txt").write_text("hello")
    elif breakage == "corrupt_zip":
        target = tmp_path / "w.zip"
        target.write_bytes(b"PK\x03\x04 not really a zip")
    elif breakage == "bad_json":
        _release(demo_weights, target, datasets=("Dataset001_Abdomen",))
        next(target.rglob("plans.json")).write_text("{ nope")
    with pytest.raises(WeightsError, match=expect):
        if breakage in ("corrupt_zip",):
            w.install(target)
        else:
            w.load_weights(target)
