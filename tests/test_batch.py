"""mrannotator batch: a cohort of NIfTI files and DICOM studies segmented on a real local Ray.

One batch run over 18 MR phantoms (6 NIfTI, 12 DICOM studies: every region with each header field that can
name it, as DICOM_STUDIES pairs them), a CT series and a corrupt file serves most checks (module-scoped); a
worker process is killed during it.
A CSV manifest of 10 DICOM studies is then run on a two-node Ray cluster, and again as a subprocess
driver that is SIGKILLed at about half, interrupted with SIGINT, and resumed.
"""

from __future__ import annotations

import json
import operator
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# a local Ray publishes its services on loopback only when this is set before ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import psutil
import pydicom
import ray

from mrannotator.batch import load_region_keywords, plan_inputs, run_batch
from mrannotator.batch.tables import COHORT_COLUMNS
from mrannotator.cli import main
from mrannotator.dicom import find_series, load_series
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import write_series

pytestmark = pytest.mark.cluster

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique", "axial_reversed", "LPS")
GENERATORS = ("prostate", "knee", "abdomen", "pelvis", "shoulder", "spine")
NIFTI_REGIONS = ("prostate", "knee", "prostate", "knee", "prostate", "knee")  # small ones: all 4 models run
# the one model a DICOM study of each phantom should run, and the regions its header names
MODEL_OF = {"prostate": "Dataset003_PelvisProstate", "pelvis": "Dataset003_PelvisProstate",
            "knee": "Dataset002_ShoulderKnee", "shoulder": "Dataset002_ShoulderKnee",
            "abdomen": "Dataset001_Abdomen", "spine": "Dataset004_Spine"}
REGIONS_OF = {"spine": "cervical_spine,lumbar_spine,thoracic_spine"}
HEADER_WORDS = {"prostate": "PROSTATE", "knee": "KNEE", "abdomen": "ABDOMEN", "pelvis": "PELVIS",
                "shoulder": "SHOULDER", "spine": "SPINE"}
IGNORED_COLUMNS = ["seconds", "node"]  # measurements, not results
# study i: region GENERATORS[i % 6], header field i % 4 (body part, series or study description, protocol):
# i % 6 and i % 4 share their parity, so 12 studies reach every (region, field) pair that 24 would (each once)
DICOM_STUDIES = 12


def _dicom_study(folder: Path, image, region: str, i: int) -> None:
    """A DICOM MR study whose header names the region in one of the four routing fields."""
    word = HEADER_WORDS[region]
    where = i % 4
    texts = {"body_part": word if where == 0 else "", "study_description": f"MR {word.lower()}" if where == 2 else
             "MR study", "series_description": f"T2 {word} sag" if where == 1 else "T2 3D"}
    files = write_series(image, folder, **texts)
    for f in files:  # header fields the fixture writer has no argument for
        ds = pydicom.dcmread(f)
        ds.PatientAge = f"{30 + 2 * i:03d}Y"
        ds.ProtocolName = f"{word.lower()}_t2_3d" if where == 3 else "t2_3d"
        ds.save_as(f)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cohort")
    (root / "nifti").mkdir()
    expect = {}  # case name -> (kind, generator, source image)
    for i, region in enumerate(NIFTI_REGIONS):
        p = make_phantom(region, seed=100 + i, orientation=ORIENTATIONS[i % len(ORIENTATIONS)])
        path = root / "nifti" / f"{region}{i:02d}.nii.gz"
        nib.save(p.image, path)
        expect[f"nifti_{region}{i:02d}"] = ("nifti", region, path)
    (root / "nifti" / "corrupt.nii.gz").write_bytes((root / "nifti" / "prostate00.nii.gz").read_bytes()[:700])
    for i in range(DICOM_STUDIES):
        region = GENERATORS[i % len(GENERATORS)]
        p = make_phantom(region, seed=200 + i, orientation=ORIENTATIONS[(i // 6 + i) % len(ORIENTATIONS)])
        _dicom_study(root / "dicom" / f"study{i:02d}" / "t2", p.image, region, i)
        expect[f"dicom_study{i:02d}_t2"] = ("dicom", region, root / "dicom" / f"study{i:02d}" / "t2")
    ct = make_phantom("abdomen", seed=999)
    write_series(ct.image, root / "dicom" / "ct_study" / "ct", modality="CT", body_part="ABDOMEN")
    return {"root": root, "expect": expect}


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(scope="module")
def main_run(cohort, tmp_path_factory, demo_weights) -> dict:
    """One batch over the whole cohort on an embedded local Ray (2 workers); after the first case returns,
    that worker's process is SIGKILLed while it holds the next case, and the local Ray's sockets are listed."""
    out = tmp_path_factory.mktemp("batch_out")
    seen = {"records": [], "killed": None, "listening": None}

    def on_record(record):
        seen["records"].append(record)
        if seen["killed"] is None and record.get("status") == "done":
            pids = {p.pid for p in _descendants()}
            seen["listening"] = {c.laddr.ip for c in psutil.net_connections("inet")
                                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
            os.kill(record["pid"], signal.SIGKILL)
            seen["killed"] = record["pid"]

    summary = run_batch(cohort["root"], out, workers=2, preview=True, weights=demo_weights, quiet=True,
                        on_record=on_record, private=False)
    return {"out": out, "summary": summary, **seen}


@pytest.fixture(scope="module")
def ledger_records(main_run) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in _records(main_run["out"] / "ledger")}


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_every_mr_case_matches_the_segmenter_voxel_for_voxel(cohort, main_run, ledger_records, segmenter):
    out = main_run["out"]
    for case, (kind, _, src) in cohort["expect"].items():
        rec = ledger_records[case]
        assert rec["status"] == "done", rec.get("error")
        if kind == "nifti":
            ref = segmenter.segment(src)
        else:
            (series,) = find_series(src).series
            ref = segmenter.segment(load_series(series), regions=rec["regions"].split(","))
        got = nib.load(out / f"{case}_seg.nii.gz")
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(ref.labels.dataobj)), case
        assert np.allclose(got.affine, ref.labels.affine), case
    assert main_run["summary"].processed == len(cohort["expect"]) + 1  # + the corrupt file


def test_ct_series_and_corrupt_file_are_failures_and_nothing_else(cohort, main_run):
    import pandas as pd

    failures = pd.read_csv(main_run["out"] / "failures.csv").fillna("")
    assert list(failures.columns) == ["case", "path", "status", "series_number", "description", "error"]
    by_error = " | ".join(failures["error"])
    assert len(failures) == 2, by_error
    corrupt = failures[failures["case"] == "nifti_corrupt"]
    assert len(corrupt) == 1 and "corrupt or truncated" in corrupt["error"].iloc[0]
    ct = failures[failures["error"].str.contains("modality CT")]
    assert len(ct) == 1 and "MR only" in ct["error"].iloc[0]
    assert ct["path"].iloc[0].endswith("ct_study/ct") and ct["series_number"].iloc[0] == 1
    assert set(failures["status"]) == {"refused"}
    assert main_run["summary"].failed == 2
    cases = pd.read_csv(main_run["out"] / "cases.csv").fillna("")  # every input once: 18 MR, corrupt, CT
    assert sorted(cases["case"]) == sorted([*cohort["expect"], "nifti_corrupt", ct["case"].iloc[0]])
    assert (cases.set_index("case").loc[list(cohort["expect"]), "status"] == "done").all()


def test_cohort_table_rows_match_the_case_reports(cohort, main_run, ledger_records):
    import pandas as pd

    out = main_run["out"]
    table = pd.read_parquet(out / "cohort.parquet")
    assert list(table.columns) == list(COHORT_COLUMNS)
    csv = pd.read_csv(out / "cohort.csv")
    key = ["case", "structure", "id", "voxels", "volume_ml", "mean_intensity"]
    pd.testing.assert_frame_equal(table[key], csv[key])
    assert set(table["case"]) == set(cohort["expect"])
    for case, (kind, _, src) in cohort["expect"].items():
        report = json.loads((out / f"{case}_structures.json").read_text())
        rows = table[table["case"] == case]
        assert [(r["name"], r["id"], r["voxels"], r["volume_ml"]) for r in report["structures"]] == list(
            zip(rows["structure"], rows["id"], rows["voxels"], rows["volume_ml"], strict=True)), case
        assert set(rows["mode"]) == {report["mode"]} and set(rows["regions"]) == {ledger_records[case]["regions"]}
        labels = _labels(out / f"{case}_seg.nii.gz")
        image = np.asarray((load_series(find_series(src).series[0]) if kind == "dicom" else nib.load(src)).dataobj)
        for _, r in rows.head(2).iterrows():  # mean intensity inside the structure, from the image itself
            assert r["mean_intensity"] == pytest.approx(float(image[labels == r["id"]].mean()), abs=1e-3)
        if kind == "dicom":
            assert set(rows["Manufacturer"]) == {"MRAnnotator test fixtures"} and set(rows["PatientSex"]) == {"O"}
            assert rows["MagneticFieldStrength"].eq(1.5).all() and rows["PatientAge"].str.endswith("Y").all()
        else:
            assert rows["PatientAge"].isna().all() or (rows["PatientAge"] == "").all()
    assert "PatientName" not in table.columns and "PatientID" not in table.columns
    assert (out / "cohort.png").stat().st_size > 10_000


def test_dicom_headers_route_to_one_model_and_nifti_runs_all(cohort, ledger_records):
    for case, (kind, region, _) in cohort["expect"].items():
        rec = ledger_records[case]
        if kind == "dicom":
            assert rec["models_run"] == [MODEL_OF[region]], (case, rec["routed_by"])
            assert rec["regions"] == REGIONS_OF.get(region, region)
            assert HEADER_WORDS[region] in rec["routed_by"].upper()
        else:
            assert rec["regions"] == "all" and len(rec["models_run"]) == 4


def test_killed_worker_is_replaced_and_its_case_retried(main_run, ledger_records, cohort):
    assert main_run["killed"] is not None
    retried = [r for r in ledger_records.values() if r.get("attempt", 1) > 1]
    assert retried, "no case was retried after its worker was killed"
    assert all(r["status"] == "done" for r in retried)
    assert all(r["pid"] != main_run["killed"] for r in retried)  # a new worker process did them
    assert main_run["summary"].retried >= 1
    # their labels are checked against the Segmenter with every other case (first test)
    assert {r["case"] for r in retried} <= set(cohort["expect"])


def test_local_ray_listens_on_loopback_only_and_is_gone_after(main_run):
    assert main_run["listening"], "no listening socket found for the local Ray"
    assert main_run["listening"] <= {"127.0.0.1", "::ffff:127.0.0.1"}, main_run["listening"]
    assert not ray.is_initialized()


def test_preview_pictures_show_the_labels_in_catalogue_colours(main_run, cohort):
    from PIL import Image

    from mrannotator import load_catalogue

    cat = load_catalogue()
    for case in list(cohort["expect"])[::7]:
        labels = _labels(main_run["out"] / f"{case}_seg.nii.gz")
        largest = int(np.bincount(labels.ravel())[1:].argmax()) + 1
        png = np.asarray(Image.open(main_run["out"] / f"{case}_preview.png").convert("RGB")).astype(int)
        legend_colour = np.asarray(cat.by_id(largest).color)  # legend patches are drawn opaque
        assert (np.abs(png - legend_colour).sum(-1) <= 3).sum() > 20, case


# ------------------------------------------------------------------ manifest, two nodes, resume
@pytest.fixture(scope="module")
def manifest(cohort, tmp_path_factory) -> Path:
    """10 DICOM studies (relative paths, case ids), a row for a missing study."""
    folder = tmp_path_factory.mktemp("manifest")
    rows = ["case_id,path"]
    for i in range(10):
        rows.append(f"m{i:02d},{os.path.relpath(cohort['root'] / 'dicom' / f'study{i:02d}', folder)}")
    rows.append("gone,no/such/study")
    (folder / "cohort.csv").write_text("\n".join(rows) + "\n")
    return folder / "cohort.csv"


@pytest.fixture(scope="module")
def two_node_run(manifest, tmp_path_factory, demo_weights) -> dict:
    from ray.cluster_utils import Cluster

    out = tmp_path_factory.mktemp("two_nodes")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024**2})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        summary = run_batch(manifest, out, weights=demo_weights, quiet=True)  # workers: one per CPU
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"out": out, "summary": summary, "nodes": nodes}


def test_two_node_cluster_spreads_cases_with_identical_results(two_node_run, main_run):
    import pandas as pd

    out = two_node_run["out"]
    assert len(two_node_run["nodes"]) == 2 and two_node_run["summary"].workers == 2
    table = pd.read_parquet(out / "cohort.parquet")
    assert set(table["node"]) == two_node_run["nodes"]  # both nodes segmented cases, each recorded
    assert set(table["case"]) == {f"m{i:02d}" for i in range(10)}
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["case"]) == ["gone"] and "not found" in failures["error"].iloc[0]
    assert (table["path"].fillna("") == "").all()  # private by default: no DICOM folder in the public tables
    whole = pd.read_parquet(main_run["out"] / "cohort.parquet")
    for i in range(10):
        a = _labels(out / f"m{i:02d}_seg.nii.gz")
        b = _labels(main_run["out"] / f"dicom_study{i:02d}_t2_seg.nii.gz")
        assert np.array_equal(a, b)
        cols = ["structure", "id", "voxels", "volume_ml", "mean_intensity", "regions", "PatientAge"]
        mine = table[table["case"] == f"m{i:02d}"][cols].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, whole[whole["case"] == f"dicom_study{i:02d}_t2"][cols].reset_index(
            drop=True))


def _batch_cmd(manifest: Path, out: Path, weights: Path, *extra: str, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "mrannotator.cli", "batch", "-i", str(manifest), "-o", str(out), "--workers",
            str(workers), "--weights", str(weights), *extra]


def _records(ledger: Path) -> list[Path]:
    """Ledger record files (not the temporary files of a write in progress)."""
    return sorted(p for p in ledger.glob("*.json") if not p.name.startswith(".")) if ledger.is_dir() else []


def _wait_for_records(proc, ledger: Path, n: int, timeout: float = 300) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = len(_records(ledger))
        if done >= n or proc.poll() is not None:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} ledger records after {timeout} s")


def _kill_driver(proc: subprocess.Popen, sig: int) -> list[psutil.Process]:
    """Signal the driver; returns its Ray processes, to be ended by the test if they outlive it."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    return children


def _end_leftovers(processes: list[psutil.Process]) -> None:
    """A SIGKILLed driver's Ray agents live on for about a minute: ended here, by PID (psutil checks that each
    PID is still the process it was)."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_resume_after_sigkill_and_ctrl_c_processes_each_case_once(manifest, two_node_run, tmp_path, demo_weights):
    import pandas as pd

    out, ledger = tmp_path / "out", tmp_path / "out" / "ledger"
    driver = subprocess.Popen(_batch_cmd(manifest, out, demo_weights, "--quiet"))
    leftovers = []
    try:
        first = _wait_for_records(driver, ledger, 4)  # of 9 MR cases
        leftovers = _kill_driver(driver, signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
        _end_leftovers(leftovers)
    assert 4 <= first < 9 and not (out / "cohort.csv").exists()
    kept = {p.name: (p.stat().st_mtime_ns, json.loads(p.read_text())["run"]) for p in _records(ledger)}
    outputs = {f"{n[:-5]}_seg.nii.gz": (out / f"{n[:-5]}_seg.nii.gz").stat().st_mtime_ns for n in kept}

    # second run: Ctrl-C (SIGINT) after one more case: a clean stop, exit code 130, tables not written. One worker
    # (one case at a time), so that cases are still to do when the signal comes
    assert len(_records(ledger)) <= 7  # the killed run's workers may have finished the cases they held
    # Ctrl-C as a terminal sends it: SIGINT handled as by default even when this suite runs as a background job
    # (a non-interactive shell starts those with SIGINT ignored, and children inherit that)
    driver = subprocess.Popen(_batch_cmd(manifest, out, demo_weights, "--quiet", workers=1),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = _wait_for_records(driver, ledger, len(kept) + 1)
        leftovers = _kill_driver(driver, signal.SIGINT)
        rc = driver.wait(60)
        assert rc == 130, f"exit code {rc}: {len(kept)} records kept from the first run, {seen} when Ctrl-C was sent"
    finally:
        driver.kill()
        _end_leftovers(leftovers)
    assert not (out / "cohort.csv").exists()

    # third run finishes the rest; exit code 2: the manifest's missing study is a failure
    done = subprocess.run(_batch_cmd(manifest, out, demo_weights, "--quiet"), timeout=600)
    assert done.returncode == 2
    records = {p.name: json.loads(p.read_text()) for p in _records(ledger)}
    assert sorted(records) == [f"m{i:02d}.json" for i in range(10)]  # one record per case
    for name, (mtime, run) in kept.items():  # cases finished before the kill were not done again
        assert records[name]["run"] == run and (ledger / name).stat().st_mtime_ns == mtime
    for name, mtime in outputs.items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert len({r["run"] for r in records.values()}) >= 2
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"
    whole = pd.read_parquet(two_node_run["out"] / "cohort.parquet").drop(columns=IGNORED_COLUMNS)
    resumed = pd.read_parquet(out / "cohort.parquet").drop(columns=IGNORED_COLUMNS)
    pd.testing.assert_frame_equal(resumed, whole)
    assert (out / "failures.csv").read_text() == (two_node_run["out"] / "failures.csv").read_text()


# ------------------------------------------------------------------ changed inputs and weights, bad input
def test_changed_input_or_other_weights_reprocess_only_what_changed(tmp_path, demo_weights, capsys):
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for i, region in enumerate(("prostate", "knee")):
        nib.save(make_phantom(region, seed=i).image, src / f"{region}.nii.gz")
    out = tmp_path / "out"
    other = tmp_path / "weights"  # other weights: the same models with an edited plans.json
    shutil.copytree(demo_weights, other, ignore=shutil.ignore_patterns("*.md"))
    for plans in other.glob("*/*/plans.json"):
        plans.write_text(plans.read_text() + "\n")
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:  # one local Ray for the four batches (each still starts its own worker)
        def batch(weights=demo_weights, quiet=True):
            return run_batch(src, out, regions=["prostate", "knee"], weights=weights, quiet=quiet, workers=1)

        first = batch(quiet=False)
        progress = capsys.readouterr().err  # the progress line: done / total, cases per minute, ETA, failures
        assert "2/2 cases" in progress and "cases/min" in progress and "ETA" in progress and "0 failed" in progress
        again = batch()
        assert (first.processed, again.processed, again.already_done) == (2, 0, 2)
        nib.save(make_phantom("knee", seed=7).image, src / "knee.nii.gz")  # a changed input file
        changed = batch()
        assert (changed.processed, changed.already_done) == (1, 1)
        rerun = batch(other)
        assert (rerun.processed, rerun.already_done) == (2, 0)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("content, message", [
    ("case_id,file\na,x.nii.gz\n", "no 'path' column"),
    ("", "no 'path' column"),
])
def test_bad_manifest_is_refused_with_exit_code_2(tmp_path, capsys, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    assert main(["batch", "-i", str(manifest), "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "ledger").exists()


def test_missing_or_empty_input_is_refused(tmp_path, capsys):
    assert main(["batch", "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["batch", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert "no NIfTI file, DICOM series or manifest row" in capsys.readouterr().err


def test_unknown_region_in_regions_option_is_refused(tmp_path):
    nib.save(make_phantom("knee", seed=0).image, tmp_path / "k.nii.gz")
    assert main(["batch", "-i", str(tmp_path / "k.nii.gz"), "-o", str(tmp_path / "o"), "--regions", "brain"]) == 2


# ------------------------------------------------------------------ routing table and preview on segment
@pytest.mark.parametrize("header, regions", [
    ({"BodyPartExamined": "KNEE"}, ("knee",)),
    ({"BodyPartExamined": "LSPINE"}, ("lumbar_spine",)),
    ({"SeriesDescription": "t2_tse L-Spine sag"}, ("lumbar_spine",)),  # longest keyword wins over SPINE
    ({"ProtocolName": "WHOLE SPINE"}, ("cervical_spine", "lumbar_spine", "thoracic_spine")),
    ({"BodyPartExamined": "ABDOMENPELVIS"}, ("abdomen", "pelvis")),
    ({"StudyDescription": "MRT Schulter links", "ProtocolName": "knee?"}, ("knee", "shoulder")),
    ({"BodyPartExamined": "BRAIN", "SeriesDescription": "T1 MPRAGE"}, None),  # no keyword: all regions
    ({"SeriesDescription": "KNEECAP"}, None),  # whole words only
])
def test_region_keywords_route_headers(header, regions):
    assert load_region_keywords().route(header).regions == regions


def test_every_region_is_reachable_by_a_keyword():
    from mrannotator.catalogue import REGIONS

    table = load_region_keywords()
    reachable = {r for words in table._by_words for r in table._by_words[words]}
    assert reachable == set(REGIONS)


def test_plan_names_cases_like_segment_and_routes_explicit_regions(cohort):
    plan = plan_inputs(cohort["root"] / "nifti", regions=["knee"])
    assert sorted(c.name for c in plan.cases) == sorted(["corrupt", *(n[6:] for n in cohort["expect"]
                                                                        if n.startswith("nifti_"))])
    assert {c.route.regions for c in plan.cases} == {("knee",)}


def test_planning_by_ray_tasks_equals_serial_planning(cohort, monkeypatch):
    """The DICOM folders of a tree are read by Ray tasks (about FILES_PER_TASK files each); the plan is the serial
    one, in the same order."""
    from mrannotator.batch.cluster import connect, ray_map

    serial = plan_inputs(cohort["root"] / "dicom")
    session = connect(None)
    monkeypatch.setattr("mrannotator.batch.scan.FILES_PER_TASK", 100)  # 13 series of 48 files: 7 tasks
    try:
        by_tasks = plan_inputs(cohort["root"] / "dicom", map_fn=lambda f, items: ray_map(f, items, per_task=1))
        squares = ray_map(operator.mul, [(i, i) for i in range(10)], per_task=4)
        pids = ray_map(os.getpid, [()] * 10, per_task=4)
    finally:
        session.close()
    assert by_tasks == serial
    assert len(serial.cases) == DICOM_STUDIES and len(serial.skipped) == 1  # the MR studies; CT is skipped
    assert squares == [i * i for i in range(10)]  # in order
    assert len(pids) == 10 and os.getpid() not in pids  # computed by Ray's worker processes


def test_segment_preview_option_writes_the_picture(tmp_path, demo_weights):
    nib.save(make_phantom("knee", seed=3).image, tmp_path / "knee.nii.gz")
    rc = main(["segment", "-i", str(tmp_path / "knee.nii.gz"), "-o", str(tmp_path / "o"), "--regions", "knee",
               "--device", "cpu", "--weights", str(demo_weights), "--preview", "--quiet"])
    assert rc == 0
    png = tmp_path / "o" / "knee_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_embedded_ray_never_joins_a_cluster_already_running_here(tmp_path, demo_weights):
    """Without --address, batch starts its own Ray even when another one (`ray start`, a test cluster) runs on the
    machine: a bare ray.init() would join that one."""
    from ray.cluster_utils import Cluster

    nib.save(make_phantom("knee", seed=1).image, tmp_path / "knee.nii.gz")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024**2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        theirs = {n["NodeID"] for n in ray.nodes()}
        ray.shutdown()
        cmd = _batch_cmd(tmp_path / "knee.nii.gz", tmp_path / "out", demo_weights, "--quiet", "--regions", "knee")
        assert subprocess.run(cmd, timeout=600).returncode == 0
    finally:
        cluster.shutdown()
    record = json.loads((tmp_path / "out" / "ledger" / "knee.json").read_text())
    assert record["status"] == "done" and record["node"] not in theirs


# ------------------------------------------------------------------ every input accounted for, resume checks outputs
def _all_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_cohort_accounts_for_every_input_once(tmp_path, demo_weights):
    """Empty-result cases, sidecars, a refused series, OUT inside INPUT, a deleted output; private names."""
    import pandas as pd

    src = tmp_path / "in"
    knee = make_phantom("knee", seed=5)
    (src / "nifti").mkdir(parents=True)
    nib.save(knee.image, src / "nifti" / "knee.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(knee.image.shape, np.float32), knee.image.affine), src / "nifti" / "blank.nii.gz")
    for sidecar in ("knee.json", "dwi.bval", "dwi.bvec"):
        (src / "nifti" / sidecar).write_text("{}\n")
    study = src / "SITE" / "PAT000" / "STUDY1"
    write_series(knee.image, study / "SER1", body_part="KNEE")
    (study / "SER1" / "export.txt").write_text("exported\n")
    write_series(make_phantom("abdomen", seed=6).image, study / "SER2", modality="CT", series_number=7,
                 series_description="CT abdomen")
    out = src / "out"  # OUT inside INPUT: left out of the scan, never segmented
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        first = run_batch(src, out, regions=["knee"], weights=demo_weights, quiet=True, workers=1)
        cases = pd.read_csv(out / "cases.csv").fillna("")
        (out / "nifti_knee_seg.nii.gz").unlink()  # a deleted output: the ledger alone must not count
        second = run_batch(src, out, regions=["knee"], weights=demo_weights, quiet=True, workers=1)
    finally:
        ray.shutdown()
    assert any("inside INPUT" in n for n in first.notes)
    assert len(cases) == 4 and cases["case"].is_unique  # knee, blank, the MR series, the CT series
    by_status = cases.groupby("status")["case"].apply(sorted).to_dict()
    assert by_status["empty"] == ["nifti_blank"] and cases.set_index("case").loc["nifti_blank", "structures"] == 0
    assert len(by_status["done"]) == 2 and len(by_status["refused"]) == 1
    refused = cases[cases["status"] == "refused"].iloc[0]
    assert refused["series_number"] == 7 and refused["description"] == "CT abdomen" and "MR only" in refused["error"]
    assert (first.total, first.empty, first.failed, first.sidecars) == (3, 1, 1, 4)
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["case"]) == [refused["case"]]
    # private names: no folder name in the public tables; the key maps back
    for table in ("cases.csv", "cohort.csv", "failures.csv"):
        text = (out / table).read_text()
        assert "PAT000" not in text and "SITE" not in text, table
    key = pd.read_csv(out / "private" / "names.csv")
    assert set(key["case"]) == {c for c in cases["case"] if c.startswith("c")}
    assert key["path"].str.contains("PAT000").all()
    # second run: only the case whose output was deleted is done again, and it is back
    assert (second.processed, second.already_done, second.total) == (1, 2, 3)
    assert (out / "nifti_knee_seg.nii.gz").is_file()
    assert pd.read_csv(out / "cases.csv").fillna("").drop(columns=["seconds", "node"]).equals(
        cases.drop(columns=["seconds", "node"]))
    assert not [p for p in _all_files(out) if p.name.startswith(".")]


HOSTILE_IDS = ["..", "../../escape", ".hidden", "a/b", "A/B", "ok"]


def test_hostile_manifest_ids_are_renamed_and_nothing_escapes(tmp_path, demo_weights, capsys):
    import pandas as pd

    data = tmp_path / "data"
    data.mkdir()
    nib.save(make_phantom("knee", seed=8).image, data / "k.nii.gz")
    rows = ["case_id,path", *(f"{i},data/k.nii.gz" for i in HOSTILE_IDS), "missing,data/none.nii.gz"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "deep" / "out"
    before = _all_files(tmp_path)
    cmd = ["batch", "-i", str(tmp_path / "m.csv"), "-o", str(out), "--weights", str(demo_weights), "--regions",
           "knee", "--workers", "1"]
    assert main([*cmd, "--dry-run"]) == 0
    assert _all_files(out) == {out / "plan.csv"}  # a dry run writes the plan only
    plan = pd.read_csv(out / "plan.csv")
    assert sorted(plan["status"]) == ["planned"] * 6 + ["refused"]
    assert main([*cmd, "--quiet"]) == 2  # the missing row is refused
    err = capsys.readouterr().err
    for i in ("'..'", "'../../escape'", "'.hidden'", "'a/b'"):
        assert i in err, err  # each renamed row is named
    new = _all_files(tmp_path) - before
    assert all(p.resolve().is_relative_to(out.resolve()) for p in new), new
    assert not [p for p in new if any(part.startswith(".") for part in p.relative_to(out).parts)]
    cases = pd.read_csv(out / "cases.csv")
    assert len(cases) == 7 and cases["case"].is_unique
    assert (cases["status"] == "done").sum() == 6
    assert {f"{c}.json" for c in cases["case"][cases["status"] == "done"]} == {
        p.name for p in (out / "ledger").glob("*.json")}


# ------------------------------------------------------------------ the README's cluster recipe, with `ray start`
def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` (the processes it starts stay its children, so the test can end them by PID)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_cli, "start", *args, "--num-cpus", "1", "--disable-usage-stats", "--block"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    while "block forever" not in log.read_text():
        assert proc.poll() is None and time.monotonic() - t0 < 180, log.read_text()[-3000:]
        time.sleep(0.5)
    return proc


def _stop_ray_start(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` (it ends what it started); whatever is left is killed by PID."""
    family = []
    for proc in procs:
        try:
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(family, timeout=30)
    _end_leftovers(alive)


def test_readme_cluster_recipe_two_ray_start_nodes_relative_paths(cohort, segmenter, tmp_path, demo_weights):
    """Two `ray start` processes on 127.0.0.1 as the README says (token auth: RAY_AUTH_MODE=token and the same
    RAY_AUTH_TOKEN everywhere), plus only what two nodes on one machine need (their own ports, --num-cpus 1);
    a relative -i and a relative manifest; the labels equal the in-process Segmenter's, as the embedded run's do
    (first test)."""
    import secrets
    import shutil

    import pandas as pd

    work = tmp_path / "shared"
    for i in range(3):
        shutil.copytree(cohort["root"] / "dicom" / f"study{i:02d}", work / "studies" / f"study{i:02d}")
    (work / "m.csv").write_text("case_id,path\n" + "".join(f"m{i},studies/study{i:02d}\n" for i in range(3)))
    # this module sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for its embedded Rays: a real cluster must not have it
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port, *p = _free_ports(11)
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    agent = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port"]
    procs = []
    try:
        procs.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                 "--include-dashboard", "false", "--temp-dir", str(temp / "h"),
                                 "--ray-client-server-port", str(p[0]),
                                 *[x for a, q in zip(agent, p[1:5], strict=True) for x in (a, str(q))]],
                                env, tmp_path / "head.log"))
        procs.append(_ray_start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                                 "--temp-dir", str(temp / "w"),
                                 *[x for a, q in zip(agent, p[5:9], strict=True) for x in (a, str(q))]],
                                env, tmp_path / "node.log"))

        def batch(*args, environ=env):
            cmd = [sys.executable, "-m", "mrannotator.cli", "batch", *args, "--address", f"127.0.0.1:{port}",
                   "--workers", "2", "--weights", str(demo_weights), "--quiet"]
            return subprocess.run(cmd, cwd=work, env=environ, capture_output=True, text=True, timeout=600)

        folder = batch("-i", "studies", "-o", "out_folder", "--folder-names")
        listed = batch("-i", "m.csv", "-o", "out_manifest")
        no_token = batch("-i", "m.csv", "-o", "out_refused",
                         environ={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")})
    finally:
        _stop_ray_start(procs)
        shutil.rmtree(temp, ignore_errors=True)
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert no_token.returncode == 4 and "authentication token" in no_token.stderr, no_token.stderr[-2000:]
    for out, name in (("out_folder", "study{:02d}_t2"), ("out_manifest", "m{}")):
        cases = pd.read_csv(work / out / "cases.csv")
        assert sorted(cases["case"]) == [name.format(i) for i in range(3)] and (cases["status"] == "done").all()
        for i in range(3):
            regions = json.loads((work / out / "ledger" / f"{name.format(i)}.json").read_text())["regions"]
            (series,) = find_series(work / "studies" / f"study{i:02d}").series
            ref = segmenter.segment(load_series(series), regions=regions.split(","))
            a = _labels(work / out / f"{name.format(i)}_seg.nii.gz")
            assert np.array_equal(a, np.asarray(ref.labels.dataobj)), (out, i)


def test_address_nobody_answers_on_is_exit_code_4_unreachable(tmp_path, capsys):
    nib.save(make_phantom("knee", seed=2).image, tmp_path / "k.nii.gz")
    (port,) = _free_ports(1)
    assert main(["batch", "-i", str(tmp_path / "k.nii.gz"), "-o", str(tmp_path / "o"), "--address",
                 f"127.0.0.1:{port}"]) == 4
    assert "unreachable" in capsys.readouterr().err


def test_worker_that_cannot_see_input_takes_no_case_and_the_batch_says_which_node(tmp_path, demo_weights):
    """INPUT not mounted on a node: the worker there reports the missing path before any case; with no worker
    left, the batch stops with exit code 4's error naming the node and the path."""
    from mrannotator.batch.cluster import ClusterError, RaySession, start_workers
    from mrannotator.batch.driver import _Dispatcher
    from mrannotator.batch.ledger import Ledger
    from mrannotator.batch.progress import Progress

    nib.save(make_phantom("knee", seed=4).image, tmp_path / "k.nii.gz")
    plan = plan_inputs(tmp_path / "k.nii.gz", regions=["knee"])
    args = {"out_dir": str(tmp_path / "out"), "run": {"run": "t"}, "weights": str(demo_weights), "device": "cpu",
            "threads": 1, "mode": "exact", "regions": ["knee"], "preview": False}
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    session = RaySession(started_here=False, connected_here=False)
    try:
        actors = start_workers(session, 1, args, 1, 0.0)
        dispatch = _Dispatcher(actors, plan.cases, 0, Ledger(tmp_path / "out"), {"run": "t"},
                               Progress(1, 0, 0, True), None, in_flight=1,
                               check_paths=[str(tmp_path), "/mnt/not-mounted-here/studies"])
        with pytest.raises(ClusterError, match="not-mounted-here") as err:
            dispatch.run()
    finally:
        session.end_workers()
        ray.shutdown()
    assert err.value.exit_code == 4 and "on node" in str(err.value)
    assert not (tmp_path / "out" / "ledger").exists()  # no case was taken


def _split_and_echo_tree(root: Path) -> dict:
    """A knee series split over two folders (slices 1..k, k+1..n; the second half alone misses its first slices)
    and a two-echo series in one folder (echo 2 twice as bright)."""
    knee = make_phantom("knee", seed=5).image
    data = np.asanyarray(knee.dataobj)
    k = data.shape[2] // 2
    shifted = knee.affine.copy()
    shifted[:3, 3] += knee.affine[:3, 2] * k
    split = pydicom.uid.generate_uid()
    write_series(nib.Nifti1Image(data[:, :, :k], knee.affine), root / "P1" / "S1" / "SER1", body_part="KNEE",
                 series_instance_uid=split)
    write_series(nib.Nifti1Image(data[:, :, k:], shifted), root / "P1" / "S1" / "SER2", body_part="KNEE",
                 series_instance_uid=split, first_instance_number=k + 1, prefix="b")
    echoes = {"series_instance_uid": pydicom.uid.generate_uid(), "series_number": 3, "body_part": "KNEE"}
    write_series(knee, root / "P2" / "ME", headers={"EchoTime": "10"}, prefix="e1", **echoes)
    write_series(nib.Nifti1Image(data * 2, knee.affine), root / "P2" / "ME", headers={"EchoTime": "20"}, prefix="e2",
                 **echoes)
    return {"split": ["P1_S1_SER1", "P1_S1_SER2"], "echo": "P2_ME"}


def test_stack_option_reaches_planning_and_the_worker_read(tmp_path):
    """--stack picks the same stack of a multi-echo series in planning and in the worker's read."""
    from mrannotator.batch.worker import read_case
    from mrannotator.errors import InputError
    from mrannotator.imageio import load_image

    names = _split_and_echo_tree(tmp_path)
    folder = tmp_path / "P2" / "ME"
    volumes = {s: np.asarray(load_image(load_series(find_series(folder, stack=s).choose())).dataobj)
               for s in ("echo=1", "echo=2")}
    assert not np.array_equal(volumes["echo=1"], volumes["echo=2"])
    for stack, want in ((None, "echo=1"), ("echo=2", "echo=2")):
        plan = plan_inputs(tmp_path, stack=stack)
        (case,) = [c for c in plan.cases if c.name == names["echo"]]
        assert case.stack == want
        assert np.array_equal(np.asarray(read_case(case).dataobj), volumes[want])
    with pytest.raises(InputError, match="stack"):
        plan_inputs(tmp_path, stack="echo")  # malformed: refused before anything is read
    # the split series: both folders refused with the reason, nothing else planned for them
    plan = plan_inputs(tmp_path)
    assert [c.name for c in plan.cases] == [names["echo"]]
    refused = {s.case: s.error for s in plan.skipped}
    assert sorted(refused) == names["split"]
    assert all(e.startswith("series split across folders") for e in refused.values())
    code = main(["batch", "-i", str(tmp_path), "-o", str(tmp_path / "plan"), "--stack", "echo=2", "--dry-run",
                 "--folder-names"])
    import pandas as pd

    rows = pd.read_csv(tmp_path / "plan" / "plan.csv").set_index("case")
    assert code == 0 and rows.loc[names["echo"], "status"] == "planned"
    assert (rows.loc[names["split"], "status"] == "refused").all()


def test_cases_dispatched_while_planning_goes_on_and_split_series_refused(tmp_path, demo_weights, segmenter,
                                                                         monkeypatch):
    """Planning is held after the first folder until a case has come back: the batch must be dispatching while
    planning goes on (a batch that waited for the whole plan would wait here until the gate's safety limit). The
    first folder is half of a split series: segmented before the split showed, then refused with its outputs
    removed; every input is in the cases table once; a second run does nothing. --stack reaches the worker."""
    import threading

    import pandas as pd

    from mrannotator.batch import driver
    from mrannotator.imageio import load_image

    names = _split_and_echo_tree(tmp_path / "in")
    first_back, gate = threading.Event(), {}

    def gated_map(self, func, items):  # one folder per item (FILES_PER_TASK 1), read in the planning thread
        for i, args in enumerate(items):
            if i == 1:
                gate["passed"] = first_back.wait(timeout=300)
            yield func(*args)

    monkeypatch.setattr("mrannotator.batch.scan.FILES_PER_TASK", 1)
    monkeypatch.setattr(driver._LazySession, "scan_map", gated_map)
    order = []
    out = tmp_path / "out"
    kw = {"regions": ["knee"], "weights": demo_weights, "quiet": True, "workers": 1, "private": False,
          "stack": "echo=2", "on_record": lambda rec: (order.append(rec["case"]), first_back.set())}
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        first = run_batch(tmp_path / "in", out, **kw)
        second = run_batch(tmp_path / "in", out, **kw)
    finally:
        ray.shutdown()
    assert gate["passed"] and order[0] == names["split"][0]  # segmented before the second folder was read
    cases = pd.read_csv(out / "cases.csv").fillna("").set_index("case")
    assert sorted(cases.index) == sorted([*names["split"], names["echo"]])
    assert list(cases.loc[names["split"], "status"]) == ["refused", "refused"]
    assert cases.loc[names["split"], "error"].str.startswith("series split across folders").all()
    assert not list(out.glob(names["split"][0] + "_*"))  # its outputs removed
    assert cases.loc[names["echo"], "status"] == "done"
    record = json.loads((out / "ledger" / f"{names['echo']}.json").read_text())
    assert record["stack"] == "echo=2"
    echo2 = load_image(load_series(find_series(tmp_path / "in" / "P2" / "ME", stack="echo=2").choose()))
    want = segmenter.segment(echo2, regions=("knee",))
    assert np.array_equal(_labels(out / f"{names['echo']}_seg.nii.gz"), np.asarray(want.labels.dataobj))
    assert (first.processed, first.failed, first.total) == (2, 2, 2)
    assert (second.processed, second.already_done, second.failed) == (0, 2, 2)
    assert pd.read_csv(out / "cases.csv").fillna("").set_index("case").drop(columns=IGNORED_COLUMNS).equals(
        cases.drop(columns=IGNORED_COLUMNS))
