"""What a refused DICOM input costs: the CLI against the MAP (``python operators``), wall time and peak RSS.

    .venv/bin/python bench/dicom_refusal.py [--repeat 3] [--before /work/main]

Writes two refused 256 x 256 x 130 series (a slice missing in the middle: refused by position; the first slice
missing: refused by InstanceNumber) and runs each face on each, fresh processes, ``--repeat`` times. With
``--before REPO`` the MAP of that checkout (without the early input check) runs too, on the case it also refuses.
Prints a Markdown table of medians. Peak RSS is the child's ``ru_maxrss`` (os.wait4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def refused_inputs(root: Path) -> dict[str, Path]:
    from mrannotator.testing.dicom_fixtures import write_series

    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(rng.integers(0, 1000, (256, 256, 130)).astype(np.int16), np.diag([1.0, 1.0, 1.2, 1.0]))
    out = {}
    for name, drop in (("slice 65 missing", 64), ("first slice missing", 0)):
        folder = root / name.replace(" ", "_")
        files = write_series(image, folder, series_description="T1 3D refusal bench")
        files[drop].unlink()
        out[name] = folder
    return out


def timed(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MiB, exit code, last stderr line) of one fresh process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, code, (lines[-1] if lines else "")[:100]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", type=Path, default=None, help="a checkout whose MAP runs as it was (no early check)")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")}
    base["MRANNOTATOR_DEVICE"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        inputs = refused_inputs(Path(tmp))
        faces = {
            "CLI": (lambda src, out: [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(src), "-o", out,
                                      "--weights", str(args.weights), "--device", "cpu"], ROOT / "src"),
            "MAP": (lambda src, out: [sys.executable, str(ROOT / "operators"), "-i", str(src), "-o", out,
                                      "-m", str(args.weights)], ROOT / "src"),
        }
        if args.before:
            faces["MAP before (no early check)"] = (
                lambda src, out: [sys.executable, str(args.before / "operators"), "-i", str(src), "-o", out,
                                  "-m", str(args.weights)], args.before / "src")
        print("| input | face | exit | wall s (median) | peak RSS MiB (median) | runs | message |")
        print("|---|---|---|---|---|---|---|")
        for name, src in inputs.items():
            for face, (command, pythonpath) in faces.items():
                if face.startswith("MAP before") and name == "first slice missing":
                    continue  # the checkout before accepts it: not a refusal there
                runs = [timed(command(src, str(Path(tmp) / "out")), {**base, "PYTHONPATH": str(pythonpath)})
                        for _ in range(args.repeat)]
                walls, rss = [r[0] for r in runs], [r[1] for r in runs]
                print(f"| {name} | {face} | {runs[0][2]} | {statistics.median(walls):.2f} | "
                      f"{statistics.median(rss):.0f} | {', '.join(f'{w:.2f}' for w in walls)} | "
                      f"{runs[0][3].replace('|', '/')} |", flush=True)


if __name__ == "__main__":
    main()
