"""`mrannotator segment` and `mrannotator demo` as a user runs them (real processes, real files)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrannotator.testing.dicom_fixtures import write_series

CLI = [sys.executable, "-m", "mrannotator.cli"]


def run(*args, **kw):
    env = {**os.environ, "MRANNOTATOR_HOME": kw.pop("home", "/nonexistent-mrannotator-home")}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900, env=env, **kw)


def test_segment_the_real_mr_sample(real_mr, tmp_path):
    r = run("segment", "-i", str(real_mr), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    seg = nib.load(tmp_path / "example_mr_sm_seg.nii.gz")
    src = nib.load(real_mr)
    assert seg.shape == src.shape and np.array_equal(seg.affine, src.affine)
    report = json.loads((tmp_path / "example_mr_sm_structures.json").read_text())
    assert report["weights"]["source"] == "demo" and report["weights"]["demo"] is True
    assert report["models_run"] == ["Dataset001_Abdomen", "Dataset002_ShoulderKnee", "Dataset003_PelvisProstate",
                                    "Dataset004_Spine"]
    labels = np.asarray(seg.dataobj)
    for row in report["structures"]:
        assert row["voxels"] == int((labels == row["id"]).sum()) > 0
        assert row["volume_ml"] == pytest.approx(row["voxels"] * 0.027, rel=1e-3)
    assert "predicting" in r.stderr  # progress is shown ...
    q = run("segment", "-i", str(real_mr), "-o", str(tmp_path / "q"), "--quiet", "--regions", "abdomen")
    assert q.returncode == 0 and q.stderr == "" and q.stdout == ""  # ... and --quiet silences it


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = nib.load(Path(__file__).resolve().parents[2] / "shared/data/real_mr/example_mr_sm.nii.gz")
    out = {}
    out["missing"] = (tmp / "nope.nii.gz", "not found")
    p = tmp / "corrupt.nii.gz"
    raw = gzip.compress(good.to_bytes())
    p.write_bytes(raw[: len(raw) // 2])
    out["corrupt_gzip"] = (p, "corrupt or truncated gzip")
    p = tmp / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj)[:, :, 5:6], good.affine), p)
    out["2d"] = (p, "2D")
    p = tmp / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asarray(good.dataobj)] * 3, -1), good.affine), p)
    out["4d"] = (p, "4D")
    p = tmp / "no_dicom"
    p.mkdir()
    (p / "notes.txt").write_text("not a DICOM file")
    out["no_dicom"] = (p, "no DICOM series")
    return out


@pytest.mark.parametrize("case", ["missing", "corrupt_gzip", "2d", "4d", "no_dicom"])
def test_bad_input_is_named_and_nothing_saved_is_lost(case, tmp_path):
    src, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / f"{src.name.split('.')[0]}_seg.nii.gz"
    earlier.write_bytes(b"an earlier result")
    r = run("segment", "-i", str(src), "-o", str(out), "--quiet")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [earlier.name]  # no partial file, nothing replaced
    assert earlier.read_bytes() == b"an earlier result"


def test_missing_or_empty_weights_are_named(real_mr, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("segment", "-i", str(real_mr), "-o", str(tmp_path / "o"), "--weights", str(empty), "--quiet")
    assert r.returncode == 3 and "empty" in r.stderr
    r = run("segment", "-i", str(real_mr), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "x"), "--quiet")
    assert r.returncode == 3 and "not found" in r.stderr
    assert not (tmp_path / "o").exists()


def test_demo_runs_every_region_and_reports_dice(tmp_path):
    r = run("demo", "-o", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert [c["case"].split("_")[0] for c in report["cases"]] == ["abdomen", "pelvis", "prostate", "shoulder",
                                                                   "knee", "spine"]
    assert report["weights"]["source"] == "demo"
    assert report["mean_dice"] > 0.8
    assert "mean Dice" in r.stdout


def test_segment_a_dicom_series_folder_like_its_nifti(real_mr, tmp_path):
    write_series(real_mr, tmp_path / "dicom" / "mr")
    write_series(real_mr, tmp_path / "dicom" / "ct", modality="CT", series_number=2)  # ignored: not MR
    r = run("segment", "-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "o"), "--quiet", "--regions", "abdomen")
    assert r.returncode == 0, r.stderr
    from_dicom = nib.load(tmp_path / "o" / "dicom_seg.nii.gz")
    r = run("segment", "-i", str(real_mr), "-o", str(tmp_path / "n"), "--quiet", "--regions", "abdomen")
    from_nifti = nib.load(tmp_path / "n" / "example_mr_sm_seg.nii.gz")
    assert np.allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    assert np.array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))


def test_a_folder_without_mr_is_refused(real_mr, tmp_path):
    write_series(real_mr, tmp_path / "ct", modality="CT")
    r = run("segment", "-i", str(tmp_path / "ct"), "-o", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "no MR series" in r.stderr and "CT" in r.stderr
    assert not (tmp_path / "o").exists()
