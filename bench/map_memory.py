"""The MAP's peak memory on an ordinary 3D T1-sized series, and what a refusal costs it against the CLI.

    PYTHONPATH=src .venv/bin/python bench/map_memory.py [--shape 256x256x130] [--repeat 3] [--cli]
        [--json bench/results/map_memory.json]

The series: the bundled real MR (``../shared/data/real_mr/example_mr_sm.nii.gz``) resampled (linear) to
``--shape`` over the same field of view (``bench/memory.py``'s ``make_image``), written as single-frame MR
DICOM by ``tests/dicom_fixtures.py``. The MAP runs as ``python operators -i DIR -o OUT -m models/demo``
(MRANNOTATOR_DEVICE=cpu), a fresh process tree sampled every 50 ms (``bench/memory.py``'s sampler, here summing
RSS as well as PSS over the tree); ``ru_maxrss_mib`` is the kernel's peak of the largest process.
``--cli`` runs ``mrannotator segment`` on the same series the same way. Refusals: ``bench/dicom_refusal.py``'s
two refused series (slice 65 missing; first slice missing), each face ``--repeat`` fresh processes, medians.
The memory request in ``app.yaml`` is checked against this file by ``tests/test_map_resources.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import memory
import psutil
from dicom_refusal import refused_inputs, timed  # bench/ is on the path when run as a script
from memory import DEMO, GIB, TreePeak, make_image

ROOT = Path(__file__).resolve().parents[1]


class TreeRSS(TreePeak):
    """TreePeak that also keeps the peak of the tree's summed RSS (what a container's memory limit sees, less
    page cache; pages shared between the tree's processes counted once per process: an upper bound)."""

    peak_rss_sum = 0

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_sum = max(self.peak_rss_sum, total)
        return super().rss()

    def figures(self) -> dict:  # the keys bench/results/map_memory.json (and tests/test_map_resources.py) use
        return {"peak_rss_tree_mib": round(self.peak_rss_sum / 2**20), "peak_pss_tree_mib": round(self.peak / 2**20),
                "peak_rss_one_process_mib": round(self.peak_single / 2**20)}


def run_tree(cmd: list[str], env: dict, cap: int) -> dict:
    record = memory.run_tree(cmd, env, cap, tracker=TreeRSS)
    return {**record, "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def refusals(root: Path, repeat: int, env: dict) -> dict:
    faces = {
        "CLI": lambda src, out: [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(src), "-o", out,
                                 "--weights", str(DEMO), "--device", "cpu"],
        "MAP": lambda src, out: [sys.executable, str(ROOT / "operators"), "-i", str(src), "-o", out, "-m", str(DEMO)],
    }
    result = {}
    for name, src in refused_inputs(root).items():
        for face, command in faces.items():
            runs = [timed(command(src, str(root / "out")), env) for _ in range(repeat)]
            result.setdefault(name, {})[face] = {
                "exit": runs[0][2], "wall_s_median": round(statistics.median(r[0] for r in runs), 2),
                "wall_s_runs": [round(r[0], 2) for r in runs],
                "peak_rss_mib_median": round(statistics.median(r[1] for r in runs)), "message": runs[0][3]}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x256x130")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="also the CLI on the same series")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from mrannotator.testing.dicom_fixtures import write_series

    shape = tuple(int(s) for s in args.shape.split("x"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")}
    env["MRANNOTATOR_DEVICE"] = "cpu"
    cap = int(args.max_gb * GIB)
    record = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{psutil.virtual_memory().total / GIB:.0f} GiB, "
                         f"load average {os.getloadavg()[0]:.1f} at start",
              "command": "python bench/map_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "shape": list(shape), "weights": "models/demo"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = make_image(shape, tmp / "image.nii.gz")
        series = tmp / "series"
        write_series(image, series, series_description="T1 3D map memory bench")
        record["map"] = run_tree([sys.executable, str(ROOT / "operators"), "-i", str(series), "-o", str(tmp / "map"),
                                  "-m", str(DEMO)], env, cap)
        print(json.dumps(record["map"]), flush=True)
        if args.cli:
            record["cli"] = run_tree([sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(series), "-o",
                                      str(tmp / "cli"), "--weights", str(DEMO), "--device", "cpu", "--quiet"], env, cap)
            print(json.dumps(record["cli"]), flush=True)
        record["refusal"] = refusals(tmp / "refused", args.repeat, {**env, "PYTHONPATH": str(ROOT / "src")})
    record["machine"] += f", {os.getloadavg()[0]:.1f} at the end"
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
