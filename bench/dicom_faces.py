"""CLI vs MONAI Deploy app on the same DICOM series: every transfer syntax, every plane, broken folders.

    .venv/bin/python bench/dicom_faces.py [--weights DIR] [--out results/dicom_faces.json]

Each series is the abdomen phantom (86 x 66 x 28, 3.5 x 3.5 x 6 mm) written by tests/dicom_fixtures.py.
Both faces run as fresh processes: `mrannotator segment -i DIR -o OUT --weights W` and
`python operators -i DIR -o OUT -m W`. Prints one markdown row per case: exit codes, output files, the
slices of the label map, structures found, and how many voxels differ between the two label maps.
Default weights: the demo abdomen model alone (a copy of models/demo/Dataset001_Abdomen).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from mrannotator.phantoms import make_phantom  # noqa: E402
from mrannotator.testing.dicom_fixtures import TRANSFER_SYNTAXES, write_series  # noqa: E402  (the test fixture writer)

PLANES = ("sagittal", "coronal", "axial_reversed", "oblique")


def write_cases(root: Path) -> dict[str, Path]:
    """One folder per case: 8 transfer syntaxes (axial), 4 more planes, 6-decimal cosines, 3 broken folders."""
    image = {o: make_phantom("abdomen", seed=7, orientation=o).image for o in ("axial", *PLANES)}
    cases = {}
    for name, syntax in TRANSFER_SYNTAXES.items():
        write_series(image["axial"], root / f"axial_{name}", transfer_syntax=syntax)
        cases[f"axial_{name}"] = root / f"axial_{name}"
    for plane in PLANES:
        write_series(image[plane], root / plane)
        cases[plane] = root / plane
    write_series(image["oblique"], root / "oblique_iop6", iop_decimals=6)
    cases["oblique_iop6"] = root / "oblique_iop6"
    files = write_series(image["axial"], root / "missing_slice")
    files[14].unlink()
    write_series(image["axial"], root / "dangling_symlink")
    os.symlink(root / "gone.dcm", root / "dangling_symlink" / "aaa.dcm")  # listed first
    write_series(image["axial"], root / "symlink_loop")
    os.symlink("aaa.dcm", root / "symlink_loop" / "aaa.dcm")
    os.symlink(".", root / "symlink_loop" / "loop")
    for name in ("missing_slice", "dangling_symlink", "symlink_loop"):
        cases[name] = root / name
    return cases


def run(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    return r, time.perf_counter() - t0


def labels(out: Path) -> np.ndarray | None:
    found = sorted(out.glob("*_seg.nii.gz")) + sorted(out.glob("mrannotator_labels.nii.gz"))
    return np.asanyarray(nib.load(found[0]).dataobj) if found else None


def compare(name: str, folder: Path, weights: Path, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")}
    env["MRANNOTATOR_DEVICE"] = "cpu"
    cli, cli_s = run([sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(folder), "-o",
                      str(work / "cli" / name), "--weights", str(weights), "--device", "cpu"], env)
    app, app_s = run([sys.executable, str(ROOT / "operators"), "-i", str(folder), "-o", str(work / "map" / name),
                      "-m", str(weights)], env)
    a, b = labels(work / "cli" / name), labels(work / "map" / name)
    row = {"case": name, "cli_rc": cli.returncode, "map_rc": app.returncode, "cli_s": round(cli_s, 1),
           "map_s": round(app_s, 1),
           "outputs": [len(list((work / f / name).glob("*"))) if (work / f / name).exists() else 0
                       for f in ("cli", "map")],
           "skipped_reported": ["skipped" in cli.stderr, "skipped" in app.stdout + app.stderr]}
    if a is not None and b is not None:
        row.update(slices=[a.shape[2], b.shape[2]], structures=len(np.unique(a)) - 1,
                   labelled_voxels=int((a > 0).sum()), differing_voxels=int((a != b).sum()))
    else:
        row["errors"] = [r.stderr.strip().splitlines()[-1][:160] for r in (cli, app) if r.returncode]
    return row


HEADER = ("| case | CLI rc | app rc | outputs (CLI, app) | slices | structures | voxels differing | CLI s | app s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    return (f"| {r['case']} | {r['cli_rc']} | {r['map_rc']} | {r['outputs']} | {r.get('slices', '-')} | "
            f"{r.get('structures', '-')} | {r.get('differing_voxels', '-')} | {r['cli_s']} | {r['map_s']} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--cases", nargs="+", help="only these cases (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dicom_faces.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicom-faces-"))
    rows = []
    print(HEADER, flush=True)
    try:
        weights = args.weights
        if weights is None:
            weights = work / "weights"
            shutil.copytree(ROOT / "models" / "demo" / "Dataset001_Abdomen", weights / "Dataset001_Abdomen")
        cases = write_cases(work / "cases")
        for name in args.cases or cases:  # in the order given
            rows.append(compare(name, cases[name], weights, work))
            print(markdown_row(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
