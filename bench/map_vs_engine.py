"""Wall time and peak RSS: the MONAI Deploy app on the real MR series vs the engine alone on the same volume.

    .venv/bin/python bench/map_vs_engine.py [--weights models/demo] [--device cpu] [--repeat 2]

Both run as fresh processes (what a deployment pays per study): the app as `python operators -i DICOM
-o OUT -m WEIGHTS` on a DICOM series written from ../shared/data/real_mr/example_mr_sm.nii.gz; the
engine as `Segmenter(weights).segment(nifti)` on that NIfTI. Peak RSS is the child's ru_maxrss (wait4).
Prints one markdown table row per run, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_MR = ROOT.parent / "shared" / "data" / "real_mr" / "example_mr_sm.nii.gz"

ENGINE = """
import json, sys, time
t0 = time.perf_counter()
from mrannotator import Segmenter
seg = Segmenter(weights=sys.argv[1], device=sys.argv[2])
t1 = time.perf_counter()
r = seg.segment(sys.argv[3])
print(json.dumps({"load_s": t1 - t0, "segment_s": r.seconds, "structures": len(r.structures)}))
"""


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, combined output) of one child process."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    from mrannotator.testing.dicom_fixtures import write_series  # the test fixture writer

    work = Path(tempfile.mkdtemp(prefix="map-bench-"))
    write_series(REAL_MR, work / "dicom")
    env = {**os.environ, "MRANNOTATOR_DEVICE": args.device}
    print(f"# {REAL_MR.name} as a DICOM series of {len(list((work / 'dicom').iterdir()))} slices; weights "
          f"{args.weights}; device {args.device}; {os.cpu_count()} CPUs")
    print("| run | wall s | peak RSS MiB | inference s | structures |")
    print("|---|---|---|---|---|")
    rows = {"app (`python operators`)": [], "engine alone (`Segmenter.segment`)": []}
    for i in range(args.repeat):
        out = work / f"out{i}"
        wall, rss, log = measure([sys.executable, str(ROOT / "operators"), "-i", str(work / "dicom"), "-o", str(out),
                                  "-m", str(args.weights)], env)
        m = re.search(r"(\d+) structures found in ([\d.]+) s", log)
        rows["app (`python operators`)"].append((wall, rss, float(m.group(2)), int(m.group(1))))
        wall, rss, log = measure([sys.executable, "-c", ENGINE, str(args.weights), args.device, str(REAL_MR)], env)
        r = json.loads(log.strip().splitlines()[-1])
        rows["engine alone (`Segmenter.segment`)"].append((wall, rss, r["segment_s"], r["structures"]))
        for name, runs in rows.items():
            w, m_, s_, n = runs[-1]
            print(f"| {name}, run {i + 1} | {w:.1f} | {m_:.0f} | {s_:.1f} | {n} |", flush=True)
    for name, runs in rows.items():
        med = [statistics.median(col) for col in zip(*runs, strict=True)]
        print(f"| **{name}, median of {len(runs)}** | {med[0]:.1f} | {med[1]:.0f} | {med[2]:.1f} | {runs[0][3]} |")


if __name__ == "__main__":
    main()
