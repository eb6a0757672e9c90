"""Engine vs stock nnU-Net v2 on the same model and volume: wall time (median of N) and peak RSS.

    python bench/engine_vs_stock.py [--runs 3] [--dataset 1] [--weights models/demo] [--out bench/results]

Single volume: one `mrannotator segment` process vs one `nnUNetv2_predict` process (same model, same
LAS volume, CPU), each a fresh process, timed from start to exit; peak RSS from the kernel.
Batch: 10 volumes in one engine process (`Segmenter` loaded once) vs 10 `nnUNetv2_predict` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REGION_OF = {1: "abdomen", 2: "shoulder", 3: "pelvis", 4: "spine"}


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run ``cmd`` in a wrapper that reports the child's own peak RSS."""
    wrapper = [sys.executable, __file__, "--_child", json.dumps(cmd)]
    t0 = time.perf_counter()
    r = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed: {r.stderr[-2000:]}")
    return wall, float(r.stdout.strip().splitlines()[-1])


def child(cmd_json: str) -> int:
    cmd = json.loads(cmd_json)
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode:
        sys.stderr.write(r.stderr.decode()[-3000:])
        return r.returncode
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # KiB -> MiB
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dataset", type=int, default=1)
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--_child", default=None)
    args = ap.parse_args(argv)
    if args._child:
        return child(args._child)

    from mrannotator.phantoms import make_phantom

    tmp = Path(tempfile.mkdtemp(prefix="mra-bench-"))
    region = REGION_OF[args.dataset]
    inp = tmp / "in"
    inp.mkdir()
    for k in range(args.batch):
        nib.save(make_phantom(region, seed=50_000 + k, orientation="LAS").image, inp / f"case{k:02d}_0000.nii.gz")
    one = tmp / "one"
    one.mkdir()
    (one / "case00_0000.nii.gz").symlink_to(inp / "case00_0000.nii.gz")
    env = {**os.environ, "nnUNet_results": str(args.weights), "nnUNet_raw": str(tmp), "nnUNet_preprocessed": str(tmp),
           "MRANNOTATOR_HOME": str(tmp / "home"), "OMP_NUM_THREADS": str(os.cpu_count())}
    ds = f"{args.dataset:03d}"
    stock = [str(BIN / "nnUNetv2_predict"), "-d", ds, "-c", "3d_fullres", "-f", "0", "-tr",
             "nnUNetTrainerNoMirroring", "-device", "cpu", "--disable_progress_bar"]
    ours = [str(BIN / "mrannotator"), "segment", "--weights", str(args.weights), "--regions", region,
            "--device", "cpu", "--quiet"]
    rows = {}

    def run(name, cmd):
        res = [measure(cmd, env) for _ in range(args.runs)]
        rows[name] = {"median_s": round(statistics.median(r[0] for r in res), 2),
                      "runs_s": [round(r[0], 2) for r in res], "peak_rss_mib": round(max(r[1] for r in res))}
        print(f"{name:<34s} median {rows[name]['median_s']:7.2f} s  peak RSS {rows[name]['peak_rss_mib']:6d} MiB",
              flush=True)

    run("stock nnUNetv2_predict, 1 volume", [*stock, "-i", str(one), "-o", str(tmp / "s1")])
    run("mrannotator segment, 1 volume", [*ours, "-i", str(inp / "case00_0000.nii.gz"), "-o", str(tmp / "o1")])
    batch_stock = [sys.executable, "-c", (
        "import subprocess,sys,pathlib,shutil\n"
        f"for f in sorted(pathlib.Path({str(inp)!r}).glob('*.nii.gz')):\n"
        f"    d=pathlib.Path({str(tmp)!r})/'b1'/f.name[:6]; d.mkdir(parents=True, exist_ok=True)\n"
        "    (d/f.name).unlink(missing_ok=True); (d/f.name).symlink_to(f)\n"
        f"    subprocess.run({stock!r}+['-i',str(d),'-o',str(d)+'_out'],check=True,stdout=subprocess.DEVNULL,"
        "stderr=subprocess.DEVNULL)\n")]
    run(f"stock, {args.batch} CLI calls", batch_stock)
    batch_ours = [sys.executable, "-c", (
        "import pathlib\nfrom mrannotator import Segmenter\n"
        f"s=Segmenter(weights={str(args.weights)!r}, device='cpu', regions=[{region!r}])\n"
        f"for f in sorted(pathlib.Path({str(inp)!r}).glob('*.nii.gz')): s.segment(f)\n")]
    run(f"engine, {args.batch} volumes, one process", batch_ours)
    r1 = rows["mrannotator segment, 1 volume"]["median_s"] / rows["stock nnUNetv2_predict, 1 volume"]["median_s"]
    rb = rows[f"engine, {args.batch} volumes, one process"]["median_s"] / rows[f"stock, {args.batch} CLI calls"][
        "median_s"]
    print(f"ratio single volume engine/stock: {r1:.2f}x   batch of {args.batch}: {rb:.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"engine_vs_stock_d{ds}.json").write_text(json.dumps(
            {"rows": rows, "ratio_single": round(r1, 3), "ratio_batch": round(rb, 3), "runs": args.runs,
             "cpu_count": os.cpu_count(), "dataset": ds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
