"""Click bench: a simulated annotator corrects each structure of the demo abdomen model's proposal with clicks.

The standard protocol of interactive segmentation (``mrannotator.evaluation.clicks``): each next click at
the voxel deepest inside the largest error region (foreground click for a missed region, background for
a false one), up to 20 clicks per structure, Dice after every click, each structure corrected on its own
from the model's proposal (all clicks so far sent with every interaction, as SmartEdit does). The
refinement is ``mrannotator.refine.refine`` on the served model's probability for that structure
(``Segmenter.segment(..., probabilities=True)``, computed once per image: an interaction runs no network).

Sites: ``t1`` (the easy contrast-only new site of ``mrannotator.sites``) and the hard sites of
``mrannotator.hard_sites`` (anatomical variation + acquisition shifts); plus the bundled real MR
(``../shared/data/real_mr``) against its TotalSegmentator reference; plus good proposals (``good_proposals``:
every region's phantoms at the training contrast, all region models merged, 5 clicks per structure: a click
must not make a good structure worse).

    python bench/interactive.py                                  # every site, 3 cases each, real MR
    python bench/interactive.py --sites hard_t1 --cases 1 --no-real-mr --out /tmp/x.json   # smoke

Writes ``bench/results/interactive.json`` (the issue's schema) and ``interactive_detail.json`` next to it
(every Dice curve, click and latency).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_MR = ROOT.parent / "shared" / "data" / "real_mr"
SITES = ("t1", "hard_t1", "hard_t2_hires", "shifted_t2", "hard_t2_smallfov")
SEED = 60_000  # bench phantoms: far from the demo weights' training (< 1,000) and the study's seeds
# TotalSegmentator total_mr label values of the structures the demo abdomen model knows
TOTAL_MR = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "pancreas": 7,
            "aorta": 23, "inferior_vena_cava": 24}
MAX_CLICKS = 20


def phantom(site: str, seed: int):
    from mrannotator.hard_sites import HARD_SITES, make_hard_phantom
    from mrannotator.sites import make_site_phantom

    if site in HARD_SITES:
        return make_hard_phantom(seed, site)[0]
    return make_site_phantom("abdomen", seed=seed, site=site)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0))


def enough(dices: list[float]) -> bool:
    """Every figure of the bench is known: Dice@10, and 0.90 reached (so NoC@85 / NoC@90 are too)."""
    return len(dices) > 10 and max(dices) >= 0.90


def click_runs(seg, refine, image: nib.Nifti1Image, truth: np.ndarray, sids, max_clicks: int, enough=None,
               without_probability: str = "zeros"):
    """Segment once (with probabilities), then click-correct each of ``sids`` present in ``truth``, each from
    the proposal on its own. A structure the served models give no probability for starts from zeros
    (``without_probability="zeros"``) or is left out (``"skip"``). Returns (segmentation, {sid: ClickRun})."""
    from mrannotator.evaluation.clicks import simulate
    from mrannotator.refine_shape import long_axis_of

    result = seg.segment(image, probabilities=True)
    start = np.asanyarray(result.labels.dataobj)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    spacing = spacing_of(image.affine)
    axis = long_axis_of(image.affine)
    runs = {}
    for sid in sids:
        mask = truth == sid
        if not mask.any():
            continue  # a missing organ: nothing to click for (its false voxels are not scored)
        prob = result.probabilities.get(sid)
        if prob is None:
            if without_probability == "skip":
                continue
            prob = np.zeros(start.shape, np.float32)

        def run_refine(fg, bg, sid=sid, prob=prob):
            return refine(data, start, prob, sid, foreground=fg, background=bg, spacing=spacing, long_axis=axis)

        runs[sid] = simulate(run_refine, start, mask, sid, max_clicks, spacing, enough)
    return result, runs


def correct_case(seg, refine, image: nib.Nifti1Image, truth: np.ndarray, structures: dict[int, str],
                 full: bool) -> dict[str, dict]:
    """Segment once (with probabilities), then click-correct each structure present in ``truth``."""
    result, runs = click_runs(seg, refine, image, truth, structures, MAX_CLICKS, None if full else enough)
    out = {"segment_seconds": result.seconds}
    for sid, run in runs.items():
        out[structures[sid]] = {"dices": [round(d, 4) for d in run.dices],
                                "seconds": [round(s, 4) for s in run.seconds],
                                "clicks": [[*c.point, int(c.foreground)] for c in run.clicks]}
    return out


def summarise(cases: list[dict]) -> dict:
    from mrannotator.evaluation.clicks import dice_at, noc

    rows: dict[str, list[dict]] = {}
    for case in cases:
        for name, r in case.items():
            if name == "segment_seconds":
                continue
            d = r["dices"]
            rows.setdefault(name, []).append({
                "start": d[0], "noc85": noc(d, 0.85)[0], "noc90": noc(d, 0.90)[0], "reached90": noc(d, 0.90)[1],
                "d5": dice_at(d, 5), "d10": dice_at(d, 10)})

    def mean(key, rs):
        return round(float(np.mean([r[key] for r in rs])), 3)

    per = {name: {"n": len(rs), "start_dice": mean("start", rs), "noc85": mean("noc85", rs),
                  "noc90": mean("noc90", rs), "dice_at_5": mean("d5", rs), "dice_at_10": mean("d10", rs),
                  "reached_090": sum(r["reached90"] for r in rs)} for name, rs in sorted(rows.items())}
    flat = [r for rs in rows.values() for r in rs]
    return {"start_dice_mean": mean("start", flat), "noc85_mean": mean("noc85", flat),
            "noc90_mean": mean("noc90", flat), "dice_at_5_mean": mean("d5", flat), "per_structure": per}


def real_mr_case(seg, refine, structures: dict[int, str], full: bool) -> dict:
    image = nib.load(str(REAL_MR / "example_mr_sm.nii.gz"))
    ref = np.asanyarray(nib.load(str(REAL_MR / "example_seg_mr.nii.gz")).dataobj).astype(np.int16)
    ids = {name: sid for sid, name in structures.items()}
    truth = np.zeros(ref.shape, np.uint8)
    for name, value in TOTAL_MR.items():
        truth[ref == value] = ids[name]
    return correct_case(seg, refine, image, truth, structures, full)


GOOD_REGIONS = ("knee", "shoulder", "prostate", "pelvis", "lumbar_spine", "abdomen")
GOOD_SEEDS = (77, 78)
GOOD_CLICKS = 5


def good_proposals(refine, threads: int, regions=GOOD_REGIONS, seeds=GOOD_SEEDS) -> dict:
    """Clicks on proposals that are already good: phantoms of every region at the training contrast, all region
    models merged (as the server serves them), each structure clicked GOOD_CLICKS times by the same protocol.
    A click must not make a good structure worse: ``worse_after_5`` counts structures whose Dice after 5 clicks
    is more than 0.005 below their start."""
    from mrannotator.engine import Segmenter
    from mrannotator.phantoms import make_phantom

    seg = Segmenter(ROOT / "models" / "demo", device="cpu", threads=threads)
    out: dict = {}
    for region in regions:
        rows = []
        for seed in seeds:
            ph = make_phantom(region, seed=seed)
            truth = np.asanyarray(ph.labels.dataobj)
            sids = sorted(set(np.unique(truth).tolist()) - {0})
            _, runs = click_runs(seg, refine, ph.image, truth, sids, GOOD_CLICKS, without_probability="skip")
            for run in runs.values():
                d = run.dices
                rows.append(d + [d[-1]] * (GOOD_CLICKS + 1 - len(d)))
        a = np.asarray(rows)
        out[region] = {"n": len(rows), "start_dice_mean": round(float(a[:, 0].mean()), 3),
                       "dice_at_1_mean": round(float(a[:, 1].mean()), 3),
                       "dice_at_5_mean": round(float(a[:, GOOD_CLICKS].mean()), 3),
                       "worse_after_5": int((a[:, GOOD_CLICKS] < a[:, 0] - 0.005).sum()),
                       "largest_one_click_drop": round(float(np.max(a[:, :-1] - a[:, 1:])), 3)}
        print("good", region, json.dumps(out[region]), flush=True)
    total = {"n": sum(v["n"] for v in out.values()), "worse_after_5": sum(v["worse_after_5"] for v in out.values())}
    return {"regions": out, **total}


def machine() -> str:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs (torch threads {os.environ.get('BENCH_THREADS', 2)}),"
            f" {psutil.virtual_memory().total / 2**30:.0f} GiB")


def load_refine(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "refine")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default=",".join(SITES))
    ap.add_argument("--cases", type=int, default=3, help="phantoms per site")
    ap.add_argument("--no-real-mr", action="store_true")
    ap.add_argument("--full", action="store_true", help="always 20 clicks (default: stop once Dice@10 and 0.90 known)")
    ap.add_argument("--refine", default="mrannotator.refine:refine", help="module:function of the refinement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-good", action="store_true", help="skip the clicks on good proposals of every region")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "interactive.json")
    args = ap.parse_args(argv)
    from mrannotator.engine import Segmenter

    os.environ["BENCH_THREADS"] = str(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    refine = load_refine(args.refine)
    seg = Segmenter(ROOT / "models" / "demo", regions=["abdomen"], device="cpu", threads=args.threads)
    structures = {s.id: s.name for s in seg.structures}
    detail: dict = {"sites": {}, "real_mr": None}
    sites: dict = {}
    for site in [s for s in args.sites.split(",") if s]:
        cases = []
        for k in range(args.cases):
            ph = phantom(site, SEED + k)
            t0 = time.perf_counter()
            cases.append(correct_case(seg, refine, ph.image, np.asanyarray(ph.labels.dataobj), structures, args.full))
            print(f"{site} case {k}: {time.perf_counter() - t0:.0f} s", flush=True)
        detail["sites"][site] = cases
        sites[site] = summarise(cases)
        print(site, json.dumps({k: v for k, v in sites[site].items() if k != "per_structure"}), flush=True)
    result = {"sites": sites}
    if not args.no_real_mr:
        case = real_mr_case(seg, refine, structures, args.full)
        detail["real_mr"] = case
        per = {n: round(r["dices"][min(10, len(r["dices"]) - 1)], 3) for n, r in case.items() if n != "segment_seconds"}
        result["real_mr"] = {"dice_at_10": per, "dice_at_10_mean": round(float(np.mean(list(per.values()))), 3)}
        detail["real_mr_start_dice"] = {n: case[n]["dices"][0] for n in per}
        print("real_mr", json.dumps(result["real_mr"]), flush=True)
    if not args.no_good:
        result["good_proposals"] = good_proposals(refine, args.threads)
    secs = [s for cases in detail["sites"].values() for c in cases for n, r in c.items() if n != "segment_seconds"
            for s in r["seconds"]]
    secs += [s for n, r in (detail["real_mr"] or {}).items() if n != "segment_seconds" for s in r["seconds"]]
    result["latency_p95_s"] = round(float(np.percentile(secs, 95)), 3) if secs else None
    result.update(machine=machine(), date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                  command="python bench/interactive.py " + " ".join(sys.argv[1:] if argv is None else argv))
    detail.update(load_average_at_start=load_start, load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                  latency_p95_s_by_site={s: _p95(cs) for s, cs in detail["sites"].items()}, refine=args.refine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    write_json(args.out.with_name(args.out.stem + "_detail.json"), detail)
    print(json.dumps({k: v for k, v in result.items() if k != "sites"}, indent=1))
    return 0


def _p95(cases: list[dict]) -> float | None:
    secs = [s for c in cases for n, r in c.items() if n != "segment_seconds" for s in r["seconds"]]
    return round(float(np.percentile(secs, 95)), 3) if secs else None


if __name__ == "__main__":
    sys.exit(main())
