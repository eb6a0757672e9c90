"""Outputs for a hospital (issue 22): TID 1500 SR, JSON audit record, free SeriesNumbers, C-STORE to a PACS.

Real DICOM written from a phantom, the MAP run as a process (`python operators`) and the CLI, both on the
demo weights, sending to a real Orthanc (Debian's) started here on 127.0.0.1 with our AE title registered.
The app runs are grouped in one module fixture (the MAP takes ~15 s to start): delivered (MAP, CLI),
refused (MAP: an AE title Orthanc does not know), unreachable (MAP, CLI: a port nothing listens on),
and a refused input with an audit folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from test_map import dciodvfy_errors, model_equipment, phantom, run_app

from mrannotator.dicom.results import free_series_numbers
from mrannotator.dicom.sr import volumes_from_sr
from mrannotator.dicom.store import Destination, destination_from_env
from mrannotator.errors import InputError
from mrannotator.testing import orthanc_support
from mrannotator.testing.dicom_fixtures import read_series, write_series

pytestmark = [pytest.mark.pacs, pytest.mark.timeout(1500),
              pytest.mark.skipif(orthanc_support.missing() is not None, reason=str(orthanc_support.missing()))]

ROOT = Path(__file__).resolve().parents[1]
PATIENT = {"patient_name": "Doe^Jane^Q", "patient_id": "PID-4711-X"}
SOURCE_NUMBER, TAKEN_NUMBER, OTHER_STUDY_NUMBER = 5001, 6001, 6002
PACS_AE = "MRANNOTATOR"  # scripts/orthanc.py's DicomAet
FILES = {"map": ("mrannotator_seg.dcm", "mrannotator_sr.dcm", "mrannotator_structures.json",
                 "mrannotator_audit.json", "mrannotator_labels.nii.gz"),
         # the CLI names its files after the input folder (CASE = "study")
         "cli": ("study_seg.dcm", "study_sr.dcm", "study_structures.json", "study_audit.json", "study_seg.nii.gz")}


def free_port() -> int:
    return orthanc_support.orthanc.free_port()


def write_study(root: Path) -> Path:
    """The phantom as series 5001; the same study also holds series 6001 (1000 + 5001 is taken), and another
    study in the folder holds 6002 (which does not count). Both small slabs: the phantom is segmented."""
    image = phantom("axial")[0]
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    write_series(image, root / "t2", series_number=SOURCE_NUMBER, study_instance_uid=study,
                 frame_of_reference_uid=frame, series_description="T2 abdomen", **PATIENT)
    slab = nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, :10], image.affine)
    write_series(slab, root / "slab", series_number=TAKEN_NUMBER, study_instance_uid=study,
                 frame_of_reference_uid=frame, series_description="T1 slab", **PATIENT)
    write_series(slab, root / "other_study", series_number=OTHER_STUDY_NUMBER, series_description="earlier study",
                 **PATIENT)
    write_series(image, root.parent / "ct_only", modality="CT", series_description="CT abdomen")
    return root


def run_cli(study: Path, out: Path, extra: list[str], weights: Path):
    cmd = [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(study), "-o", str(out), "--weights",
           str(weights), "--device", "cpu", "--dicom-results", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_weights):
    """Orthanc up with our AE registered; every app run of this module, once; Orthanc's instances after."""
    root = tmp_path_factory.mktemp("hospital")
    study = write_study(root / "study")
    audit_dir = root / "audit"
    server = orthanc_support.orthanc.start(root / "orthanc", modalities={"mrannotator": ["MRANNOTATOR", "127.0.0.1",
                                                                                           104]})
    dead_port = free_port()  # nothing listens there
    fast_retry = {"MRANNOTATOR_DICOM_RETRIES": "1", "MRANNOTATOR_DICOM_RETRY_DELAY": "0.2"}
    dest = f"{PACS_AE}@127.0.0.1:{server.dicom_port}"
    try:
        out = {}
        m = ["-i", str(study), "-m", str(demo_weights)]
        out["map"] = run_app([*m, "-o", str(root / "map")], env={"MRANNOTATOR_DICOM_DEST": dest,
                                                                  "MRANNOTATOR_AUDIT_DIR": str(audit_dir)})
        out["map_refused"] = run_app([*m, "-o", str(root / "map_refused")], env={
            "MRANNOTATOR_DICOM_DEST": dest, "MRANNOTATOR_DICOM_CALLING_AE": "STRANGER", **fast_retry})
        out["map_unreachable"] = run_app([*m, "-o", str(root / "map_unreachable")], env={
            "MRANNOTATOR_DICOM_AE": PACS_AE, "MRANNOTATOR_DICOM_HOST": "127.0.0.1",
            "MRANNOTATOR_DICOM_PORT": str(dead_port), **fast_retry})
        out["map_bad_input"] = run_app(["-i", str(root / "ct_only"), "-o", str(root / "map_bad_input"), "-m",
                                        str(demo_weights)], env={"MRANNOTATOR_AUDIT_DIR": str(audit_dir)})
        out["cli"] = run_cli(study, root / "cli", ["--send", dest], demo_weights)
        out["cli_unreachable"] = run_cli(study, root / "cli_unreachable", [
            "--send", f"{PACS_AE}@127.0.0.1:{dead_port}", "--send-retries", "1", "--send-retry-delay", "0.2"],
            demo_weights)
        r = requests.get(f"{server.url}/instances?expand", headers=server.auth_header(), timeout=30)
        r.raise_for_status()
        arrived = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in r.json()}
    finally:
        orthanc_support.orthanc.stop(server)
    return {"procs": out, "root": root, "study": study, "audit_dir": audit_dir, "arrived": arrived,
            "dead_port": dead_port}


def outputs(runs, name: str) -> dict[str, Path]:
    kind = "cli" if name.startswith("cli") else "map"
    folder = runs["root"] / name
    return dict(zip(("seg", "sr", "json", "audit", "labels"), (folder / f for f in FILES[kind]), strict=True))


def ok(runs, name: str) -> dict[str, Path]:
    r = runs["procs"][name]
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return outputs(runs, name)


# ------------------------------------------------------------------ the structured report
@pytest.mark.parametrize("name", ["map", "cli"])
def test_sr_passes_dciodvfy_and_volumes_equal_the_json(runs, name):
    files = ok(runs, name)
    assert dciodvfy_errors(files["sr"]) == []
    sr, seg = pydicom.dcmread(files["sr"]), pydicom.dcmread(files["seg"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    rows = {r["name"]: r for r in json.loads(files["json"].read_text())["structures"]}
    back = volumes_from_sr(sr)  # highdicom's reading
    assert set(back) == set(rows) and len(rows) >= 5
    numbers = {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    labels = np.asanyarray(nib.load(files["labels"]).dataobj)
    image = np.asanyarray(read_series(runs["study"] / "t2")[1].dataobj).astype(float)
    for name_, got in back.items():
        assert got["volume_ml"] == rows[name_]["volume_ml"]
        assert got["segment_number"] == numbers[name_] and got["seg_uid"] == seg.SOPInstanceUID
        assert got["mean_intensity"] == pytest.approx(image[labels == rows[name_]["id"]].mean(), abs=1e-3)


def test_sr_read_by_dcmqi_tid1500reader(runs, tmp_path):
    files = ok(runs, "map")
    reader = Path(sys.executable).with_name("tid1500reader")
    r = subprocess.run([str(reader), "--inputDICOM", str(files["sr"]), "--outputMetadata", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "m.json").read_text())
    seg = pydicom.dcmread(files["seg"])
    numbers = {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    rows = {r["name"]: r for r in json.loads(files["json"].read_text())["structures"]}
    assert len(meta["Measurements"]) == len(rows)
    for m in meta["Measurements"]:
        assert m["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        assert m["ReferencedSegment"] == numbers[m["TrackingIdentifier"]]
        items = {i["quantity"]["CodeMeaning"]: i for i in m["measurementItems"]}
        assert items["Volume"]["units"]["CodeValue"] == "mL"
        assert float(items["Volume"]["value"]) == rows[m["TrackingIdentifier"]]["volume_ml"]
        assert items["MR signal intensity"]["derivationModifier"]["CodeMeaning"] == "Mean"


# ------------------------------------------------------------------ series numbers, audit record
@pytest.mark.parametrize("name", ["map", "cli"])
def test_series_numbers_are_free_in_the_study(runs, name):
    files = ok(runs, name)
    seg, sr = pydicom.dcmread(files["seg"]), pydicom.dcmread(files["sr"])
    # 1000 + 5001 is taken in the study; 6002 is taken only in another study: free here
    assert (int(seg.SeriesNumber), int(sr.SeriesNumber)) == (6002, 6003)
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID


def test_free_series_numbers_rules():
    assert free_series_numbers(5, set()) == [1005, 1006]
    assert free_series_numbers(5, {1005, 1007}) == [1006, 1008]
    assert free_series_numbers(2**31 - 1000, {2**31 - 1}) == [1, 2]


@pytest.mark.parametrize("name", ["map", "cli"])
def test_audit_record(runs, name):
    files = ok(runs, name)
    text = files["audit"].read_text()
    audit = json.loads(text)
    for value in PATIENT.values():
        assert value not in text  # no patient name or ID
    src = read_series(runs["study"] / "t2")[0][0]
    assert audit["status"] == "succeeded" and audit["exit_code"] == 0 and audit["error"] is None
    assert audit["input"]["study_instance_uid"] == src.StudyInstanceUID
    assert audit["input"]["series_instance_uid"] == src.SeriesInstanceUID
    assert audit["model"]["weights"]["source"] == "demo" and len(audit["model"]["weights"]["sha256"]) == 4
    assert audit["model"]["device_uid"] == model_equipment(pydicom.dcmread(files["seg"])).DeviceUID
    dicom = {o["kind"]: o for o in audit["outputs"] if o["kind"] in ("SEG", "SR")}
    for kind, key in (("SEG", "seg"), ("SR", "sr")):
        ds = pydicom.dcmread(files[key])
        assert dicom[kind]["sop_instance_uid"] == ds.SOPInstanceUID and dicom[kind]["series_number"] == ds.SeriesNumber
        assert dicom[kind]["sha256"] == hashlib.sha256(files[key].read_bytes()).hexdigest()
    assert audit["destination"]["ae_title"] == PACS_AE and audit["delivery"]["status"] == "delivered"
    assert {"segment", "send", "total"} <= set(audit["timings_s"])
    if name == "map":  # the audit folder holds a copy
        copies = [json.loads(p.read_text()) for p in runs["audit_dir"].glob("*.json")]
        assert audit in copies


# ------------------------------------------------------------------ C-STORE
def test_seg_and_sr_arrive_in_orthanc(runs):
    expected = {}
    for name in ("map", "cli"):
        files = ok(runs, name)
        for key, modality in (("seg", "SEG"), ("sr", "SR")):
            expected[str(pydicom.dcmread(files[key]).SOPInstanceUID)] = modality
    # exactly these four: nothing from the refused or unreachable runs
    assert set(runs["arrived"]) == set(expected)


def _failed(runs, name: str, why: str):
    r = runs["procs"][name]
    assert r.returncode == 4, (r.stdout + r.stderr)[-4000:]
    assert "mrannotator: error: results written to" in r.stderr and "not delivered" in r.stderr
    files = outputs(runs, name)
    for f in files.values():  # the files stay
        assert f.is_file(), f
    audit = json.loads(files["audit"].read_text())
    assert audit["status"] == "delivery_failed" and audit["exit_code"] == 4
    d = audit["delivery"]
    assert d["status"] == "failed" and why in d["error"] and why in r.stderr
    assert len(d["attempts"]) == 2  # one retry
    assert [f["status"] for f in d["files"]] == ["not sent", "not sent"]
    assert {f["sop_instance_uid"] for f in d["files"]} == {str(pydicom.dcmread(files[k]).SOPInstanceUID)
                                                            for k in ("seg", "sr")}


def test_refused_by_the_node(runs):
    _failed(runs, "map_refused", "association rejected by the node")


@pytest.mark.parametrize("name", ["map_unreachable", "cli_unreachable"])
def test_unreachable_node(runs, name):
    _failed(runs, name, f"connection refused by 127.0.0.1:{runs['dead_port']}")


def test_refused_input_is_audited_in_the_audit_folder_only(runs):
    r = runs["procs"]["map_bad_input"]
    assert r.returncode == 2 and "no MR series to segment" in r.stderr
    out = runs["root"] / "map_bad_input"
    assert not out.exists() or not any(out.iterdir())
    records = [json.loads(p.read_text()) for p in runs["audit_dir"].glob("*.json")]
    failed = [a for a in records if a["exit_code"] == 2]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "no MR series" in failed[0]["error"]
    assert failed[0]["outputs"] == [] and failed[0]["input"]["path"]


# ------------------------------------------------------------------ destination settings
def test_destination_settings_are_checked():
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    for bad in ("PACS10.0.0.5:104", "PACS@host", "WAY_TOO_LONG_AE_TITLE@h:104", "PACS@h:0", "A\\B@h:104"):
        with pytest.raises(InputError):
            Destination.parse(bad)
    assert destination_from_env({}) is None
    with pytest.raises(InputError, match="set all of"):
        destination_from_env({"MRANNOTATOR_DICOM_AE": "PACS"})
    with pytest.raises(InputError, match="not a number"):
        destination_from_env({"MRANNOTATOR_DICOM_AE": "P", "MRANNOTATOR_DICOM_HOST": "h",
                              "MRANNOTATOR_DICOM_PORT": "x"})
    got = destination_from_env({"MRANNOTATOR_DICOM_DEST": "P@h:11112", "MRANNOTATOR_DICOM_CALLING_AE": "ME"})
    assert got == Destination("P", "h", 11112, "ME")
