"""Batch planning against file count: a generated single-root DICOM tree and a flat NIfTI folder.

    python bench/planning.py [--counts 2500 5000 10000 20000] [--work /tmp/planning] [--first-case]
                             [--out bench/results/planning.json]

DICOM: one root, SITE/PATnnn/STUDY/SERnn/IMGnnnn.dcm, 50 slices of 8 x 8 pixels per series (MR, headers like a
scanner's minus the private tags), written with pydicom from one template (fast). NIfTI: one folder of N small
``.nii.gz`` files (copies of one 8 x 8 x 8 volume). For each count: ``plan_inputs(ROOT)`` alone, serially in a fresh
process without Ray (planning seconds and that process's peak RSS: the linearity figure); then
``mrannotator batch -i ROOT -o OUT --dry-run``
runs in a fresh process: wall time from start to exit (Ray start-up included when the tree is read by Ray tasks:
more than FILES_PER_TASK DICOM files), the driver's own peak RSS (``ru_maxrss``, what the issue's 500 MiB target
is about), and the peak RSS summed over the driver's process tree (Ray's services and planning tasks), sampled
every 0.1 s. ``--first-case``: a real batch on the largest DICOM tree (1 worker, demo weights, --regions knee),
seconds from start until the first case's ledger record is written; the driver is then stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SLICES = 50


def write_dicom_tree(root: Path, n_files: int) -> None:
    """``n_files`` MR headers (8 x 8 pixels) under one root, 50 per series, 2 series per study, 1 study per patient."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    base = Dataset()
    base.file_meta = FileMetaDataset()
    base.file_meta.MediaStorageSOPClassUID = MRImageStorage
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    base.SOPClassUID = MRImageStorage
    base.Modality, base.Manufacturer, base.MagneticFieldStrength = "MR", "bench", "3"
    base.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    base.BodyPartExamined, base.PatientSex, base.PatientAge = "KNEE", "O", "040Y"
    base.Rows = base.Columns = 8
    base.PixelSpacing = [1.0, 1.0]
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.SamplesPerPixel, base.PhotometricInterpretation = 1, "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 0
    base.PixelData = (np.arange(64, dtype=np.uint16) * 10).tobytes()
    uid = iter(f"1.2.826.0.1.3680043.8.498.77.{i}" for i in range(1, 10 * n_files))  # cheaper than generate_uid
    for s in range(n_files // SLICES):
        patient, series = s // 2, s % 2
        folder = root / "SITE" / f"PAT{patient:05d}" / "STUDY1" / f"SER{series + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if series == 0:
            study_uid = next(uid)
        base.PatientID, base.PatientName = f"PAT{patient:05d}", f"PATIENT^{patient}"
        base.StudyInstanceUID, base.SeriesInstanceUID = study_uid, next(uid)
        base.SeriesNumber, base.SeriesDescription = series + 1, f"T2 knee {series + 1}"
        for k in range(SLICES):
            base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = next(uid)
            base.InstanceNumber = k + 1
            base.ImagePositionPatient = [0.0, 0.0, float(k)]
            base.save_as(folder / f"IMG{k:04d}.dcm", enforce_file_format=True)


def write_nifti_folder(folder: Path, n_files: int) -> None:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), folder / "case00000.nii.gz")
    data = (folder / "case00000.nii.gz").read_bytes()
    for i in range(1, n_files):
        (folder / f"case{i:05d}.nii.gz").write_bytes(data)


def measured(cmd: list[str], env: dict, first_record: Path | None = None) -> dict:
    """Wall seconds, driver ru_maxrss and the process tree's peak RSS (MiB); with ``first_record``, the seconds until
    a file appears in that folder, after which the driver is stopped (SIGINT, then by PID)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"tree": 0.0, "driver": 0.0, "first": None}
    stop = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak["tree"] = max(peak["tree"], sum(p.memory_info().rss for p in procs) / 2**20)
                peak["driver"] = max(peak["driver"], root.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            if first_record is not None and peak["first"] is None and first_record.is_dir() and any(
                    p.suffix == ".json" and not p.name.startswith(".") for p in first_record.iterdir()):
                peak["first"] = time.perf_counter() - t0
                proc.send_signal(signal.SIGINT)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate(timeout=1800)
    stop.set()
    sampler.join()
    out = {"wall_s": round(time.perf_counter() - t0, 2), "rc": proc.returncode,
           "driver_peak_rss_mib": round(peak["driver"]), "tree_peak_rss_mib": round(peak["tree"])}
    if first_record is not None:
        out["first_case_s"] = None if peak["first"] is None else round(peak["first"], 1)
    if proc.returncode not in (0, 2, 130):
        out["stderr"] = err.decode()[-1500:]
    return out


def plan_in_process(root: Path, env: dict) -> dict:
    """``plan_inputs(root)`` alone, serially in a fresh process (no Ray): seconds and that process's peak RSS."""
    code = ("import json, resource, time; from mrannotator.batch import plan_inputs; t = time.perf_counter(); "
            f"p = plan_inputs({str(root)!r}); s = time.perf_counter() - t; print(json.dumps({{'plan_s': round(s, 2), "
            "'cases': len(p.cases), "
            "'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/planning_bench"))
    ap.add_argument("--first-case", action="store_true")
    ap.add_argument("--first-case-only", action="store_true",
                    help="only the first-case run, on the DICOM tree already in --work (of max(--counts) files)")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "planning.json")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT / "src"))}
    cli = [sys.executable, "-m", "mrannotator.cli", "batch", "--weights", str(args.weights)]
    results = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "machine": f"{platform.node()}, "
               f"{os.cpu_count()} cores", "load_at_start": [round(x, 1) for x in os.getloadavg()], "rows": []}
    for n in [] if args.first_case_only else sorted(args.counts):
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        write_dicom_tree(args.work / "dicom", n)
        write_nifti_folder(args.work / "nifti", n)
        made = time.perf_counter() - t
        row = {"files": n, "generate_s": round(made, 1)}
        for kind in ("dicom", "nifti"):
            row[kind + "_in_process"] = plan_in_process(args.work / kind, env)
            row[kind] = measured([*cli, "-i", str(args.work / kind), "-o", str(args.work / f"out_{kind}"),
                                  "--dry-run"], env)
            plan = (args.work / f"out_{kind}" / "plan.csv").read_text().count("\n") - 1
            row[kind]["cases"] = plan
        row["load"] = [round(x, 1) for x in os.getloadavg()]
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
    if args.first_case or args.first_case_only:
        out = args.work / "out_first"
        results["first_case"] = measured([*cli, "-i", str(args.work / "dicom"), "-o", str(out), "--workers", "1",
                                          "--regions", "knee", "--quiet"], env, first_record=out / "ledger")
        results["first_case"]["files"] = max(args.counts)
        print(json.dumps(results["first_case"]), flush=True)
    results["load_at_end"] = [round(x, 1) for x in os.getloadavg()]
    results["bench_self_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
