"""Peak memory and time of a large MR: the engine with all four demo models vs stock nnUNetv2_predict, one model.

    python bench/memory.py [--shape 512x512x200] [--stock 001 003] [--server] [--max-gb 12]

The bundled real MR (``../shared/data/real_mr/example_mr_sm.nii.gz``, 117 x 91 x 20 at 3 mm) is resampled
(linear) to ``--shape`` over the same field of view and written as one NIfTI. Each variant runs as a fresh
process tree; peak memory is the tree's PSS summed (the process and every descendant: stock nnU-Net
exports in a worker process), sampled every 50 ms, and the largest RSS of one of its processes;
time is the wall time of the whole command (model loading included):

- ``engine_cli``: ``mrannotator segment`` with the four demo models (the merged all-regions result);
- ``engine_cli_tiny``: the same on a 32 x 32 x 8 image: the runtime and models alone (the estimate's base);
- ``stock_DatasetNNN``: ``nnUNetv2_predict -device cpu -npp 1 -nps 1`` with that one demo model;
- ``server_infer`` (``--server``): ``POST /infer/mrannotator`` (all regions) on a MONAI Label server started
  for the run; time is the request's, peak the server tree's during it.

Guard: a run starts only with ``--max-gb`` + 1 GiB available, and its tree is killed (SIGKILL to its own
process group) if it passes ``--max-gb``: the bench can never exhaust a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
REAL_MR = ROOT.parent / "shared" / "data" / "real_mr" / "example_mr_sm.nii.gz"
DEMO = ROOT / "models" / "demo"
GIB = 2**30


def make_image(shape: tuple[int, ...], path: Path) -> nib.Nifti1Image:
    from scipy import ndimage

    src = nib.load(REAL_MR)
    data = np.asarray(src.dataobj)
    zoom = [t / s for t, s in zip(shape, data.shape, strict=True)]
    aff = src.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([1 / z for z in zoom])
    img = nib.Nifti1Image(ndimage.zoom(data.astype(np.float32), zoom, order=1).astype(data.dtype), aff)
    nib.save(img, path)
    return img


class TreePeak:
    """Peak memory of a process and its descendants, sampled in a thread; kills the tree over a cap.

    ``peak``: the tree's PSS (proportional set size: a page shared by k processes counts 1/k in each, so
    forked or spawned workers are not counted k times over), summed; ``peak_single``: the largest RSS of
    one process of the tree."""

    def __init__(self, pid: int, cap: int, kill_group: int | None = None):
        self.proc, self.cap, self.kill_group = psutil.Process(pid), cap, kill_group
        self.peak = self.peak_single = 0
        self.killed, self._stop = False, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            total += info.pss
            self.peak_single = max(self.peak_single, info.rss)
        return total

    def _run(self):
        while not self._stop.is_set():
            try:
                now = self.rss()
            except psutil.Error:
                return
            self.peak = max(self.peak, now)
            if now > self.cap and self.kill_group:
                self.killed = True
                os.killpg(self.kill_group, signal.SIGKILL)
                return
            time.sleep(0.05)

    def figures(self) -> dict:
        return {"peak_pss_mib": round(self.peak / 2**20), "peak_rss_one_process_mib": round(self.peak_single / 2**20)}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def wait_for_memory(cap: int) -> None:
    for _ in range(120):
        if psutil.virtual_memory().available > cap + GIB:
            return
        time.sleep(5)
    raise SystemExit(f"less than {(cap + GIB) / GIB:.1f} GiB available for 10 minutes: not running")


def run_tree(cmd: list[str], env: dict, cap: int, tracker: type[TreePeak] = TreePeak) -> dict:
    """Run ``cmd`` as a fresh process tree under ``tracker``: wall time and the tracker's figures."""
    wait_for_memory(cap)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    with tracker(p.pid, cap, kill_group=p.pid) as peak:
        out = p.communicate()[0].decode(errors="replace")
    dt = time.perf_counter() - t
    if p.returncode:
        reason = f"killed over the {cap / GIB:.1f} GiB cap" if peak.killed else f"exit {p.returncode}"
        raise RuntimeError(f"{' '.join(cmd)}: {reason}\n{out[-3000:]}")
    return {"wall_s": round(dt, 1), **peak.figures()}


def engine_cli(image: Path, out: Path, cap: int) -> dict:
    cmd = [sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(image), "-o", str(out), "--weights",
           str(DEMO), "--device", "cpu", "--quiet"]
    return run_tree(cmd, dict(os.environ), cap)


def stock_cli(dataset: str, image: Path, work: Path, cap: int) -> dict:
    inp = work / "stock_in"
    inp.mkdir(exist_ok=True)
    if not (inp / "case_0000.nii.gz").exists():
        (inp / "case_0000.nii.gz").symlink_to(image)
    env = {**os.environ, "nnUNet_results": str(DEMO), "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work)}
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inp), "-o", str(work / f"out_{dataset}"),
           "-d", dataset[7:10], "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerNoMirroring", "-device", "cpu",
           "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    return run_tree(cmd, env, cap)


def server_infer(image: Path, work: Path, cap: int) -> dict:
    import requests

    from mrannotator.testing.server_support import start_server, stop_server

    studies = work / "studies"
    studies.mkdir(exist_ok=True)
    (studies / "big.nii.gz").write_bytes(image.read_bytes())
    wait_for_memory(cap)
    srv = start_server(work, studies, DEMO)
    try:
        tree = TreePeak(srv.proc.pid, cap, kill_group=srv.proc.pid)
        base = tree.rss()
        t = time.perf_counter()
        with tree:
            r = requests.post(f"{srv.url}/infer/mrannotator", params={"image": "big", "output": "json"}, timeout=3600)
        dt = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"server infer: HTTP {r.status_code} {r.text[:2000]}")
        return {"wall_s": round(dt, 1), "peak_pss_mib": round(tree.peak / 2**20),
                "peak_rss_one_process_mib": round(tree.peak_single / 2**20), "pss_before_mib": round(base / 2**20)}
    finally:
        stop_server(srv)


def estimate_for(img: nib.Nifti1Image) -> dict:
    from mrannotator.engine import Segmenter
    from mrannotator.memory import estimate, profile
    from mrannotator.orientation import voxel_spacing

    seg = Segmenter(weights=DEMO, device="cpu")
    est = estimate(img.shape, voxel_spacing(img.affine), [profile(m.dataset, m.predictor) for m in seg.models])
    return {"total_mib": round(est.total / 2**20), **{k: round(v / 2**20) for k, v in est.parts.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="512x512x200")
    ap.add_argument("--stock", nargs="*", default=["001", "002", "003", "004"], help="demo dataset ids for stock")
    ap.add_argument("--server", action="store_true", help="also time POST /infer/mrannotator on a server")
    ap.add_argument("--max-gb", type=float, default=12.0, help="kill a run whose tree passes this (GiB)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    ap.add_argument("--merge", action="store_true", help="keep earlier rows it does not redo")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine rows (with --merge: keep earlier ones)")
    args = ap.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    cap = int(args.max_gb * GIB)
    work = Path(tempfile.mkdtemp(prefix="mra-memory-"))
    img = make_image(shape, work / "mr.nii.gz")
    make_image((32, 32, 8), work / "tiny.nii.gz")
    datasets = {p.name[7:10]: p.name for p in DEMO.glob("Dataset*")}
    rows: dict[str, dict] = json.loads(args.out.read_text())["rows"] if args.merge and args.out.exists() else {}
    if not args.no_engine:
        rows["engine_cli_tiny"] = engine_cli(work / "tiny.nii.gz", work / "out_tiny", cap)
        rows["engine_cli"] = engine_cli(work / "mr.nii.gz", work / "out_engine", cap)
        print("engine_cli", rows["engine_cli"], flush=True)
    for d in args.stock:
        rows[f"stock_{datasets[d]}"] = stock_cli(datasets[d], work / "mr.nii.gz", work, cap)
        print(f"stock_{datasets[d]}", rows[f"stock_{datasets[d]}"], flush=True)
    if args.server:
        rows["server_infer"] = server_infer(work / "mr.nii.gz", work, cap)
        print("server_infer", rows["server_infer"], flush=True)
    eng = rows["engine_cli"]
    for name, row in rows.items():
        if name.startswith("stock_"):
            row["engine_peak_ratio"] = round(eng["peak_pss_mib"] / row["peak_pss_mib"], 3)
            row["engine_time_ratio"] = round(eng["wall_s"] / row["wall_s"], 3)
    seg_file = work / "out_engine" / "mr_seg.nii.gz"
    earlier = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    found = (len(np.unique(np.asarray(nib.load(seg_file).dataobj))) - 1 if seg_file.exists()
             else earlier.get("engine_structures"))
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": shape, "spacing_mm": [round(float(s), 4) for s in img.header.get_zooms()[:3]],
        "engine_structures": found,
        "estimate_all_four_mib": estimate_for(img),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
