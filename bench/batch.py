"""Cohort throughput: `mrannotator segment` per case vs one in-process Segmenter loop vs `mrannotator batch` on Ray.

    python bench/batch.py [--cases 40] [--cli-cases 40] [--generators ...] [--weights models/demo]
                          [--parts a,b,b1,c,d,e,f [--merge]] [--out bench/results/batch.json]

On the same N phantoms (NIfTI, every region in turn, all four region models run on each):
  (a) N `mrannotator segment` processes, one after the other (models load N times);
  (b) one process: Segmenter loaded once, then read -> segment -> write each case (torch's default threads),
      and the same loop with one torch thread (b1);
  (c) `mrannotator batch` with 1 worker and with 2 workers, 1 thread each (local Ray started by the command).
Then routing: N DICOM studies of the same phantoms whose BodyPartExamined names the region, (d) `batch` with
1 worker (`--regions auto` routes each to one model) vs (e) one process that loads each region's model and runs
only it on each case. Last, (f): planning the N DICOM studies (their headers read) in the driver vs by Ray tasks
(Ray already running: its start-up is in the batch figures above).

Every configuration runs in fresh processes; wall time is from start to exit (model loading and Ray start-up
included); peak RSS is the largest sum of RSS over the process tree (driver, Ray's services and workers),
sampled every 0.1 s. Ray's overhead per case: (batch wall with 1 worker - the worker's own per-case seconds,
summed from the ledger) / N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = ("abdomen", "pelvis", "prostate", "shoulder", "knee", "spine")
BODY_PART = {"abdomen": "ABDOMEN", "pelvis": "PELVIS", "prostate": "PROSTATE", "shoulder": "SHOULDER",
             "knee": "KNEE", "spine": "SPINE"}
# the region to load for each BodyPartExamined: one Segmenter per model (pelvis and prostate share a model, as do
# shoulder and knee; the spine model covers every spine region)
LOAD_AT_START = [round(x, 1) for x in os.getloadavg()]
REGION_OF = {"spine": "lumbar_spine", "prostate": "pelvis", "knee": "shoulder"}


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and the peak over time of the summed RSS of its process tree (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0.0
    stop = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {proc.returncode}: {err.decode()[-2000:]}")
    result = {"wall_s": round(wall, 2), "peak_rss_mib": round(peak)}
    last = stdout.decode().strip().splitlines()[-1:] or [""]
    if last[0].startswith("{"):  # the loop scripts report their own steady-state time
        result.update(json.loads(last[0]))
    return result


def make_inputs(folder: Path, n: int, generators: tuple[str, ...]) -> tuple[Path, Path]:
    import nibabel as nib

    from mrannotator.phantoms import make_phantom
    from mrannotator.testing.dicom_fixtures import write_series

    nifti, dicom = folder / "nifti", folder / "dicom"
    nifti.mkdir(parents=True)
    for i in range(n):
        region = generators[i % len(generators)]
        image = make_phantom(region, seed=500 + i).image
        nib.save(image, nifti / f"{region}{i:02d}.nii.gz")
        write_series(image, dicom / f"study{i:02d}", body_part=BODY_PART[region])
    return nifti, dicom


def loop_script(weights: Path, src: Path, out: Path, routed: bool) -> str:
    """The in-process loop, as a user would write it; prints the loop's own seconds (models already loaded).

    routed: one Segmenter per region model, each case run by the model its BodyPartExamined names.
    """
    return f"""
import json, time; from pathlib import Path
from mrannotator import Segmenter
from mrannotator.outputs import write_outputs
from mrannotator.dicom import find_series, load_series
from mrannotator.imageio import load_image
src, out, routed, weights = Path({str(src)!r}), Path({str(out)!r}), {routed}, {str(weights)!r}
region_of = {REGION_OF!r}
if not routed:
    seg = Segmenter(weights=weights, device="cpu")
    t0 = time.perf_counter()
    for p in sorted(src.glob("*.nii.gz")):
        write_outputs(seg.segment(load_image(p)), out, p.name[:-7], str(p))
else:
    regions = {{r: region_of.get(r, r) for r in {list(BODY_PART)!r}}}
    segs = {{m: Segmenter(weights=weights, device="cpu", regions=[m]) for m in set(regions.values())}}
    t0 = time.perf_counter()
    for d in sorted(src.iterdir()):
        s = find_series(d).series[0]
        model = regions[str(s.header.BodyPartExamined).lower()]
        write_outputs(segs[model].segment(load_series(s)), out, d.name, str(d))
print(json.dumps({{"loop_s": round(time.perf_counter() - t0, 2)}}))
"""


def batch_stats(out: Path) -> dict:
    """From the ledger: cases, failures, the workers' own per-case seconds summed, and the steady-state span
    (first case finished to last case finished: start-up excluded)."""
    records = [json.loads(p.read_text()) for p in (out / "ledger").glob("*.json") if not p.name.startswith(".")]
    finished = sorted(datetime.fromisoformat(r["finished"]).timestamp() for r in records)
    return {"cases": len(records), "failed": sum(r["status"] != "done" for r in records),
            "worker_case_s": round(sum(r["seconds"] for r in records), 2),
            "steady_s_per_case": round((finished[-1] - finished[0]) / max(len(finished) - 1, 1), 3),
            "models_run_per_case": sorted({len(r.get("models_run", [])) for r in records})}


PARTS = ("a", "b", "b1", "c", "d", "e", "f")


def bench(n: int, cli_cases: int, generators: tuple[str, ...], weights: Path, tmp: Path,
          parts: tuple[str, ...] = PARTS) -> dict:
    nifti, dicom = make_inputs(tmp / "in", n, generators)
    py = sys.executable
    res = {}
    if "a" in parts:
        res.update(_cli_loop(py, nifti, n, cli_cases, weights, tmp))
    if "b" in parts:
        res["b_in_process_loop"] = run_measured([py, "-c", loop_script(weights, nifti, tmp / "b", False)])
    if "b1" in parts:
        res["b1_in_process_loop_1_thread"] = run_measured(
            [py, "-c", loop_script(weights, nifti, tmp / "b1", False)], {**os.environ, "OMP_NUM_THREADS": "1"})
    for workers in (1, 2) if "c" in parts else ():
        out = tmp / f"c{workers}"
        res[f"c_batch_{workers}_worker"] = {**run_measured(
            [py, "-m", "mrannotator.cli", "batch", "-i", str(nifti), "-o", str(out), "--workers", str(workers),
             "--threads-per-worker", "1", "--weights", str(weights), "--quiet"]), **batch_stats(out)}
    if "d" in parts:
        out = tmp / "d"
        res["d_batch_routed_1_worker"] = {**run_measured(
            [py, "-m", "mrannotator.cli", "batch", "-i", str(dicom), "-o", str(out), "--workers", "1",
             "--threads-per-worker", "1", "--weights", str(weights), "--quiet"]), **batch_stats(out)}
    if "e" in parts:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the routed loop with the worker's one thread
        res["e_routed_model_alone_loop"] = run_measured([py, "-c", loop_script(weights, dicom, tmp / "e", True)],
                                                        env)
    if "f" in parts:
        res["f_planning"] = json.loads(subprocess.run(
            [py, "-c", PLANNING_SCRIPT.format(src=str(dicom))], check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1])
    return res


def _cli_loop(py: str, nifti: Path, n: int, cli_cases: int, weights: Path, tmp: Path) -> dict:
    cli = []
    for p in sorted(nifti.glob("*.nii.gz"))[:cli_cases]:  # (a); fewer calls than cases: scaled to n below
        cli.append(run_measured([py, "-m", "mrannotator.cli", "segment", "-i", str(p), "-o", str(tmp / "a"),
                                 "--device", "cpu", "--weights", str(weights), "--quiet"]))
    return {"a_cli_per_case": {"wall_s": round(sum(c["wall_s"] for c in cli) * n / len(cli), 2),
                               "peak_rss_mib": max(c["peak_rss_mib"] for c in cli), "calls_measured": len(cli),
                               "wall_s_per_call": [c["wall_s"] for c in cli]}}


PLANNING_SCRIPT = """
import json, time
from mrannotator.batch import plan_inputs
from mrannotator.batch.cluster import connect, ray_map
t = time.perf_counter(); serial = plan_inputs({src!r}); serial_s = time.perf_counter() - t
session = connect(None)
try:
    t = time.perf_counter(); tasks = plan_inputs({src!r}, map_fn=ray_map); tasks_s = time.perf_counter() - t
finally:
    session.close()
assert tasks == serial
print(json.dumps({{"cases": len(serial.cases), "serial_s": round(serial_s, 2), "ray_tasks_s": round(tasks_s, 2)}}))
"""


def summarise(res: dict, n: int) -> dict:
    """Ratios of what was run (a partial run, e.g. ``--parts b,c``, gives the ratios it can)."""
    per_min = {k: round(60.0 * n / v["wall_s"], 2) for k, v in res.items() if "wall_s" in v}
    out: dict = {"cases_per_min": per_min}
    batch = {k: per_min[k] for k in ("c_batch_1_worker", "c_batch_2_worker") if k in per_min}
    best = max(batch.values()) if batch else None
    for key, base in (("best_batch_vs_loop", "b_in_process_loop"), ("best_batch_vs_cli", "a_cli_per_case"),
                      ("best_batch_vs_loop_1_thread", "b1_in_process_loop_1_thread")):
        if best and base in per_min:
            out[key] = round(best / per_min[base], 2)
    if "b_in_process_loop" in per_min:
        out["batch_vs_loop"] = {k: round(v / per_min["b_in_process_loop"], 2) for k, v in batch.items()}
    steady = {"b_loop": ("b_in_process_loop", "loop_s"), "b1_loop_1_thread": ("b1_in_process_loop_1_thread", "loop_s"),
              "e_model_alone": ("e_routed_model_alone_loop", "loop_s")}
    out["steady_state_s_per_case"] = {k: round(res[r][f] / n, 3) for k, (r, f) in steady.items() if r in res}
    for k, r in (("c_batch_1_worker", "c_batch_1_worker"), ("c_batch_2_worker", "c_batch_2_worker"),
                 ("d_batch_routed", "d_batch_routed_1_worker")):
        if r in res:
            out["steady_state_s_per_case"][k] = res[r]["steady_s_per_case"]
    if "c_batch_1_worker" in res:
        one = res["c_batch_1_worker"]
        out["ray_overhead_per_case_s"] = round((one["wall_s"] - one["worker_case_s"]) / n, 2)
    if "d_batch_routed_1_worker" in res and "e_routed_model_alone_loop" in res:
        routed, alone = res["d_batch_routed_1_worker"], res["e_routed_model_alone_loop"]
        out["routed_batch_vs_model_alone"] = {"wall": round(routed["wall_s"] / alone["wall_s"], 2),
                                              "steady_state": round(routed["steady_s_per_case"] / (alone["loop_s"] / n),
                                                                    2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--cli-cases", type=int, default=None,
                    help="run (a) on the first K cases only and scale its time to --cases (default: all)")
    ap.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=GENERATORS,
                    help="phantom regions, in turn (default: all six)")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="configurations to run (all of them in one run, e.g. b,c: loop and batch 1 / 2 workers)")
    ap.add_argument("--merge", action="store_true",
                    help="with --parts: replace these configurations' figures in an existing --out")
    args = ap.parse_args(argv)
    parts = tuple(args.parts.split(","))
    if set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {','.join(PARTS)}")
    merge = set(parts) != set(PARTS) and args.merge
    if merge and not (args.out and args.out.is_file()):
        ap.error("--merge needs an existing --out to merge into")
    with tempfile.TemporaryDirectory(prefix="mra-bench-batch-") as tmp:
        res = bench(args.cases, args.cli_cases or args.cases, tuple(args.generators), args.weights.resolve(),
                    Path(tmp), parts)
    if merge:  # a partial re-run merged into an earlier report, and said so
        old = json.loads(args.out.read_text())
        rerun = {"parts": list(parts), "date": datetime.now(UTC).isoformat(timespec="minutes"),
                 "command": " ".join(["python", "bench/batch.py", *sys.argv[1:]]), "replaced": {
                     k: old["results"].get(k) for k in res}}
        res = {**old["results"], **res}
        old.setdefault("reruns", []).append(rerun)
        old.update(results=res, summary=summarise(res, args.cases))
        args.out.write_text(json.dumps(old, indent=2) + "\n")
        print(json.dumps(old["summary"], indent=2))
        return 0
    report = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cases": args.cases, "parts": list(parts),
              "generators": args.generators, "command": " ".join(["python", "bench/batch.py", *sys.argv[1:]]),
              "machine": f"{platform.node()} {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
              "load_average_at_start": LOAD_AT_START, "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
              "results": res,
              "summary": summarise(res, args.cases)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
