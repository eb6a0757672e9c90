"""Simulated annotation study through the real MONAI Label server, driven by MONAILabelClient as 3D Slicer does.

A "new site" images the abdomen with another contrast (``mrannotator.sites``, T1-like) on which the
demo abdomen model starts poor. Each arm starts `monailabel start_server` on 127.0.0.1 (app
``apps/mrannotator``, ``--conf regions abdomen``) serving a copy of the demo abdomen weights, with a
studies folder of unlabelled new-site images (the pool) and a few original-contrast cases that keep
their labels (``replay``: the original training data a site keeps, so fine-tuning also sees the
original domain). Each round the simulated annotator asks ``next_sample(strategy)``, runs
``infer`` on it, "corrects" the proposal to the truth (recording the effort: voxels changed and 2D
axial slices that needed any edit), ``save_label``s it as final; after the round's cases it starts
``train`` (fine-tuning the served checkpoint on every final label so far) and, while the training
runs, keeps asking the server for inferences (latency while training vs idle; failures). The next
round uses the hot-reloaded model. After every training the held-out sets (new site and original
contrast; sent as sessions (PUT /session/), never in the datastore) are segmented through the server.

    python bench/annotation_study.py                       # full study: rounds 4,4,8,8, both arms
    python bench/annotation_study.py --schedule 2,2 --pool 6 --heldout 2 --original 2 --arms random

Writes ``bench/results/annotation_study.json`` (``--out``) and, with matplotlib, the figure next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REGION = "abdomen"
MODEL = "Dataset001_Abdomen"
TASK = "mrannotator_abdomen"  # the app's per-region infer task
TRAINER = "mrannotator"
# phantom seeds: the demo weights were trained on seeds < 1,000 and evaluated from 10,000
SEEDS = {"replay": 0, "original": 20_000, "pool": 30_000, "new_site": 40_000}
NEW_SITE = "t1"
# fine-tuning schedule of the study (see README "Annotation study" for how it was chosen)
TRAIN_PARAMS = {"max_epochs": 8, "iterations": 25, "val_iterations": 1, "learning_rate": 0.01}  # the app's defaults


@dataclass
class Case:
    name: str
    image: Path
    truth: Path  # catalogue ids of the served model's structures only (what the annotator draws)
    site: str


@dataclass
class Site:
    studies: Path
    pool: list[Case]
    replay: list[Case]
    heldout_new: list[Case]
    heldout_original: list[Case]
    structures: dict[int, str]  # catalogue id -> name, the served model's structures

    def truth_of(self, image_id: str) -> Case:
        return next(c for c in self.pool + self.replay if c.name == image_id)


def model_structures(weights: Path) -> dict[int, str]:
    from mrannotator.catalogue import load_catalogue

    cat = load_catalogue()
    dataset = json.loads(next((weights / MODEL).glob("*/dataset.json")).read_text())
    return {cat.get(n).id: cat.get(n).name for n, v in dataset["labels"].items() if int(v)}


def site_seeds(repeat: int = 0) -> dict[str, int]:
    """Phantom seeds of study repeat ``repeat``: other pools and held-out sets; replay stays among the demo
    weights' training seeds (< 1,000), as the data a site keeps."""
    return {k: v + (100 if k == "replay" else 1000) * repeat for k, v in SEEDS.items()}


def make_site(root: Path, weights: Path, pool: int, heldout: int, original: int, replay: int,
              seeds: dict[str, int] | None = None, new_site: str = NEW_SITE) -> Site:
    """Write the studies folder (pool + replay images) and the held-out images, with their truths.

    ``new_site``: a contrast of ``mrannotator.sites`` or a hard site of ``mrannotator.hard_sites``."""
    seeds = seeds or SEEDS
    from mrannotator.hard_sites import HARD_SITES, make_hard_phantom
    from mrannotator.sites import make_site_phantom

    structures = model_structures(weights)
    lut = np.zeros(256, np.uint8)
    lut[list(structures)] = list(structures)
    studies, heldout_dir, truth_dir = root / "studies", root / "heldout", root / "truth"
    for d in (studies, heldout_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)

    def write(kind: str, site: str, n: int, folder: Path) -> list[Case]:
        cases = []
        for k in range(n):
            ph = (make_hard_phantom(seeds[kind] + k, site)[0] if site in HARD_SITES
                  else make_site_phantom(REGION, seed=seeds[kind] + k, site=site))
            name = f"{kind}_{k:02d}"
            truth = nib.Nifti1Image(lut[np.asanyarray(ph.labels.dataobj)], ph.labels.affine, ph.labels.header)
            nib.save(ph.image, folder / f"{name}.nii.gz")
            nib.save(truth, truth_dir / f"{name}.nii.gz")
            cases.append(Case(name, folder / f"{name}.nii.gz", truth_dir / f"{name}.nii.gz", site))
        return cases

    return Site(studies=studies, pool=write("pool", new_site, pool, studies),
                replay=write("replay", "original", replay, studies),
                heldout_new=write("new_site", new_site, heldout, heldout_dir),
                heldout_original=write("original", "original", original, heldout_dir),
                structures=structures)


# ------------------------------------------------------------------ measures
def dice_per_structure(truth: np.ndarray, pred: np.ndarray, structures: dict[int, str]) -> dict[str, float]:
    out = {}
    for sid, name in structures.items():
        t, p = truth == sid, pred == sid
        denom = int(t.sum() + p.sum())
        out[name] = 1.0 if denom == 0 else float(2 * np.logical_and(t, p).sum() / denom)
    return out


def correction_effort(truth: np.ndarray, pred: np.ndarray, slice_axis: int = 2) -> tuple[int, int]:
    """Voxels the annotator changes, and 2D slices (along ``slice_axis``: axial for LAS storage) with any edit."""
    wrong = truth != pred
    other = tuple(a for a in range(wrong.ndim) if a != slice_axis)
    return int(wrong.sum()), int(wrong.any(axis=other).sum())


def _labels(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.uint8)


def evaluate(client, site: Site) -> dict:
    """Held-out Dice of the served model: every held-out image sent as a session and inferred there."""
    out: dict = {}
    for key, cases in (("new_site", site.heldout_new), ("original", site.heldout_original)):
        per_case, efforts, version = [], [], None
        for case in cases:
            # a volume the server does not hold goes through a session, as 3D Slicer sends local volumes
            session_id = client.create_session(str(case.image))["session_id"]
            try:
                path, params = client.infer(TASK, "", {}, session_id=session_id)
            finally:
                client.remove_session(session_id)
            truth, pred = _labels(case.truth), _labels(path)
            per_case.append(dice_per_structure(truth, pred, site.structures))
            efforts.append(correction_effort(truth, pred)[0])
            version = params["checkpoints"][MODEL]["version"]
            Path(path).unlink(missing_ok=True)
        names = list(site.structures.values())
        per_structure = {n: round(float(np.mean([c[n] for c in per_case])), 4) for n in names}
        out[f"{key}_dice"] = round(float(np.mean([np.mean(list(c.values())) for c in per_case])), 4)
        out[f"{key}_dice_per_case"] = [round(float(np.mean(list(c.values()))), 4) for c in per_case]
        out[f"{key}_dice_per_structure"] = per_structure
        out[f"{key}_effort_voxels_per_case"] = round(float(np.mean(efforts)), 1)
        out["model_version"] = version
    return out


# ------------------------------------------------------------------ server
def start_study_server(root: Path, site: Site, weights: Path):
    """The real app on 127.0.0.1 serving a copy of the demo abdomen weights (fresh model_dir)."""
    from mrannotator.testing.server_support import start_server

    served = root / "weights"
    if not served.exists():
        shutil.copytree(weights / MODEL, served / MODEL)
    return start_server(root, site.studies, served, conf={"regions": REGION, "device": "cpu"})


def stop_study_server(server) -> None:
    from mrannotator.testing.server_support import stop_server

    stop_server(server)


def _train(client, params: dict, probe_image: str, timeout: float = 3600, probe_pause: float = 5.0) -> dict:
    """POST /train/ and, until it ends, infer ``probe_image`` every ``probe_pause`` s (latency while training;
    ``probe_pause`` <= 0: no probe, the training has the machine)."""
    idle = []
    for _ in range(3 if probe_pause > 0 else 0):
        t = time.perf_counter()
        client.infer(TASK, probe_image, {})
        idle.append(time.perf_counter() - t)
    client.train_start(TRAINER, params)
    during, failures, stop = [], [], threading.Event()

    def probe():
        from monailabel.client import MONAILabelClient

        own = MONAILabelClient(client.get_server_url(), tmpdir=client._tmpdir)  # its own connection
        while not stop.is_set():
            t = time.perf_counter()
            try:
                path, _ = own.infer(TASK, probe_image, {})
                Path(path).unlink(missing_ok=True)
                during.append(time.perf_counter() - t)
            except Exception as e:  # a failed request is a finding, not a crash of the study
                failures.append(f"{type(e).__name__}: {e}"[:300])
            stop.wait(probe_pause)

    thread = threading.Thread(target=probe, daemon=True)
    t0 = time.perf_counter()
    if probe_pause > 0:
        thread.start()
    deadline = time.time() + timeout
    try:
        while True:
            status = client.train_status()
            if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            if time.time() > deadline:
                client.train_stop()
                raise TimeoutError(f"training did not finish in {timeout} s")
            time.sleep(2)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(120)
    if status["status"] != "DONE":
        raise RuntimeError(f"training ended {status['status']}:\n" + "\n".join(status.get("details", [])[-30:]))
    stats = client.info()["train_stats"][TRAINER]
    idle_s = statistics.median(idle) if idle else None
    during_s = statistics.median(during) if during else None
    return {
        "train_seconds": round(stats.get("seconds", time.perf_counter() - t0), 1),
        "train_wall_seconds": round(time.perf_counter() - t0, 1),
        "train_cases": len(stats["models"][MODEL]["cases"]),
        "train_last_epoch": stats["models"][MODEL]["epochs"][-1],
        "model_version": stats.get("version"),
        "infer_idle_seconds": round(idle_s, 2) if idle_s else None,
        "infer_during_training_seconds": round(during_s, 2) if during_s else None,
        "infer_during_training_max_seconds": round(max(during), 2) if during else None,
        "infer_during_training_requests": len(during),
        "infer_latency_ratio": round(during_s / idle_s, 2) if during_s and idle_s else None,
        "infer_failures": failures,
    }


def run_arm(client, site: Site, strategy: str, schedule: list[int], train_params: dict,
            log=print, deadline: float | None = None, on_round=None) -> dict:
    """One arm of the study on a running server whose datastore holds ``site``'s pool and replay images.

    ``on_round(arm)`` is called after every round (the study saves its partial result there).
    """
    for case in site.replay:  # the original-domain cases the site keeps, labelled from the start
        client.save_label(case.name, str(case.truth), "final")
    rounds, labelled = [], 0
    arm = {"strategy": strategy, "rounds": rounds}
    for r, k in enumerate(schedule, start=1):
        if deadline and time.time() > deadline:
            log(f"[{strategy}] stopping before round {r}: out of time")
            break
        efforts, picks, t_round = [], [], time.perf_counter()
        for _ in range(k):
            pick = client.next_sample(strategy, {})
            image_id = pick["id"]
            path, params = client.infer(TASK, image_id, {})
            case = site.truth_of(image_id)
            truth, pred = _labels(case.truth), _labels(path)
            Path(path).unlink(missing_ok=True)
            voxels, slices = correction_effort(truth, pred)
            efforts.append({"id": image_id, "voxels": voxels, "slices": slices,
                            "dice": round(float(np.mean(list(dice_per_structure(truth, pred, site.structures)
                                                             .values()))), 4),
                            "entropy": pick.get("entropy"),
                            "model_version": params["checkpoints"][MODEL]["version"]})
            client.save_label(image_id, str(case.truth), "final")  # the corrected proposal = the truth
            picks.append(image_id)
        labelled += k
        voxels, slices = np.mean([e["voxels"] for e in efforts]), np.mean([e["slices"] for e in efforts])
        log(f"[{strategy}] round {r}: labelled {labelled}; effort/case {voxels:.0f} voxels, {slices:.1f} slices")
        train = _train(client, train_params, probe_image=site.replay[0].name if site.replay else picks[0])
        log(f"[{strategy}] round {r}: trained {train['train_seconds']} s on {train['train_cases']} cases; "
            f"infer {train['infer_idle_seconds']} s idle, {train['infer_during_training_seconds']} s while training")
        ev = evaluate(client, site)
        log(f"[{strategy}] round {r}: new-site Dice {ev['new_site_dice']}, original {ev['original_dice']}")
        rounds.append({
            "round": r, "labelled": labelled,
            "new_site_dice": ev["new_site_dice"], "original_dice": ev["original_dice"],
            "effort_voxels_per_case": round(float(np.mean([e["voxels"] for e in efforts])), 1),
            "effort_slices_per_case": round(float(np.mean([e["slices"] for e in efforts])), 2),
            "train_seconds": train["train_seconds"],
            "cases": efforts, "training": train, "heldout": ev,
            "round_seconds": round(time.perf_counter() - t_round, 1),
        })
        if on_round:
            on_round(arm)
    return arm


# ------------------------------------------------------------------ figure
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    start = result["start"]
    for name, arm in result["arms"].items():
        xs = [0] + [r["labelled"] for r in arm["rounds"]]
        a.plot(xs, [start["new_site_dice"]] + [r["new_site_dice"] for r in arm["rounds"]], "o-",
               label=f"{name}: new site")
        a.plot(xs, [start["original_dice"]] + [r["original_dice"] for r in arm["rounds"]], "s--",
               label=f"{name}: original contrast")
        b.plot([r["labelled"] for r in arm["rounds"]], [r["effort_voxels_per_case"] for r in arm["rounds"]], "o-",
               label=name)
    for name, cut in (result.get("interrupted") or {}).items():  # a round whose training did not finish
        b.plot([cut["labelled"]], [cut["effort_voxels_per_case"]], "o", mfc="none", label=f"{name}: {cut['label']}")
    for rep in result.get("repeats", []):  # other phantom seeds: thin lines
        for name, curve in rep["arms"].items():
            xs = [0] + [r["labelled"] for r in curve]
            a.plot(xs, [rep["start"]["new_site_dice"]] + [r["new_site_dice"] for r in curve], "-", lw=0.8, alpha=0.5,
                   label=f"{name}: new site, repeat {rep['repeat']}")
            b.plot([r["labelled"] for r in curve], [r["effort_voxels_per_case"] for r in curve], "-", lw=0.8,
                   alpha=0.5, label=f"{name}, repeat {rep['repeat']}")
    base = result.get("no_finetuning")
    if base:
        a.axhline(base["new_site_dice"], color="grey", lw=1, label="no fine-tuning: new site")
    a.set(xlabel="labelled new-site cases", ylabel="held-out mean Dice", ylim=(0, 1), title="Held-out Dice")
    a.legend(fontsize=7)
    b.set(xlabel="labelled cases at the end of the round", ylabel="voxels corrected per case",
          yscale="log", title="Correction effort per case (round's proposals)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def summarise(result: dict) -> dict:
    out = {}
    for name, arm in result["arms"].items():
        rs = arm["rounds"]
        if not rs:
            continue
        first, last = rs[0], rs[-1]
        ratios = [t["training"]["infer_latency_ratio"] for t in rs if t["training"]["infer_latency_ratio"]]
        out[name] = {
            "rounds_run": len(rs), "labelled": rs[-1]["labelled"],
            "final_new_site_dice": rs[-1]["new_site_dice"],
            "original_dice_drop": round(result["start"]["original_dice"] - rs[-1]["original_dice"], 4),
            "effort_voxels_reduction": _ratio(first["effort_voxels_per_case"], last["effort_voxels_per_case"]),
            "effort_slices_reduction": _ratio(first["effort_slices_per_case"], last["effort_slices_per_case"]),
            "max_infer_latency_ratio": max(ratios) if ratios else None,
            "infer_failures": sum(len(t["training"]["infer_failures"]) for t in rs),
            "labelled_to_reach_other_final": None,
        }
    for a, b in (("uncertainty", "random"), ("random", "uncertainty")):
        if a in out and b in out:
            target = out[b]["final_new_site_dice"]
            reach = [r["labelled"] for r in result["arms"][a]["rounds"] if r["new_site_dice"] >= target]
            out[a]["labelled_to_reach_other_final"] = reach[0] if reach else None
    return out


def combine(parts: list[Path], out: Path) -> int:
    """One result from arms that ran in separate processes (same site, same seeds, same weights)."""
    results = [json.loads(p.read_text()) for p in parts]
    merged = {**results[0], "arms": {}, "parts": [{"file": p.name, "command": r["command"], "date": r["date"]}
                                                    for p, r in zip(parts, results, strict=True)]}
    for r in results:
        merged["arms"].update(r["arms"])
    merged["summary"] = summarise(merged)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    plot(merged, out.with_suffix(".png"))
    print(json.dumps(merged["summary"], indent=1))
    return 0


def _curve(arm: dict) -> list[dict]:
    keys = ("labelled", "new_site_dice", "original_dice", "effort_voxels_per_case", "train_seconds")
    return [{k: r[k] for k in keys} for r in arm["rounds"]]


def add_repeats(out: Path, parts: list[Path]) -> int:
    """Add whole study repeats (other phantom seeds, ``--repeat N``) to the result in ``out``: their curves, and
    per arm the spread (min, mean, max over every repeat) of the final figures."""
    result = json.loads(out.read_text())
    repeats = {r["setup"].get("repeat", 0): r for r in [result, *(json.loads(p.read_text()) for p in parts)]}
    result["repeats"] = [{"repeat": k, "command": r["command"], "date": r["date"],
                          "start": {"new_site_dice": r["start"]["new_site_dice"],
                                    "original_dice": r["start"]["original_dice"]},
                          "arms": {name: _curve(arm) for name, arm in r["arms"].items()}, "summary": r["summary"]}
                         for k, r in sorted(repeats.items()) if k != result["setup"].get("repeat", 0)]
    spread = {}
    for name in result["arms"]:
        finals = [r["summary"][name] for r in repeats.values() if name in r.get("summary", {})]
        spread[name] = {key: {"min": min(v := [f[key] for f in finals]), "mean": round(statistics.mean(v), 4),
                              "max": max(v)}
                        for key in ("final_new_site_dice", "original_dice_drop", "effort_voxels_reduction",
                                    "max_infer_latency_ratio")}
        spread[name]["repeats"] = len(finals)
    result["spread"] = spread
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(spread, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", default="4,4,8,8", help="cases per round")
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=8, help="held-out new-site phantoms")
    ap.add_argument("--original", type=int, default=8, help="held-out original-contrast phantoms")
    ap.add_argument("--replay", type=int, default=8, help="labelled original-contrast cases in the datastore")
    ap.add_argument("--arms", default=None, help="default uncertainty,random (with --hard-site: + no_finetune)")
    ap.add_argument("--hard-site", default=None,
                    help="study v2 on this site of mrannotator.hard_sites: clicks then paint (bench/study_clicks.py)")
    ap.add_argument("--repeat", type=int, default=0, help="study repeat: other phantom seeds (see site_seeds)")
    ap.add_argument("--epochs", type=int, default=TRAIN_PARAMS["max_epochs"])
    ap.add_argument("--iterations", type=int, default=TRAIN_PARAMS["iterations"])
    ap.add_argument("--learning-rate", type=float, default=TRAIN_PARAMS["learning_rate"])
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--until", default=None, help="UTC HH:MM after which no new round starts")
    ap.add_argument("--probe-pause", type=float, default=5.0,
                    help="s between infer probes while training (latency while training); 0: no probe")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "annotation_study.json")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="merge the arms of these result files (arms run as separate processes) into --out")
    ap.add_argument("--add-repeats", type=Path, nargs="+", default=None,
                    help="add these results of other repeats (--repeat N) to --out, with the spread of the finals")
    ap.add_argument("--combine-hard", type=Path, nargs="+", default=None,
                    help="merge study v2 results (--hard-site; one arm / repeat per file) into --out")
    args = ap.parse_args(argv)
    if args.combine_hard:
        import study_clicks

        return study_clicks.combine_hard(args.combine_hard, args.out)
    if args.combine:
        return combine(args.combine, args.out)
    if args.add_repeats:
        return add_repeats(args.out, args.add_repeats)
    schedule = [int(x) for x in args.schedule.split(",")]
    if sum(schedule) > args.pool:
        ap.error(f"the schedule labels {sum(schedule)} cases; the pool has {args.pool}")
    train_params = {"max_epochs": args.epochs, "iterations": args.iterations, "val_iterations": 1,
                    "learning_rate": args.learning_rate}
    deadline = None
    if args.until:
        now = datetime.now(UTC)
        hh, mm = (int(x) for x in args.until.split(":"))
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        deadline = end.timestamp() if end > now else end.timestamp() + 86400

    def log(msg: str) -> None:
        print(f"{datetime.now(UTC):%H:%M:%S} {msg}", flush=True)

    if args.hard_site:
        import study_clicks

        args.arms = args.arms or ",".join(study_clicks.ARMS)
        args.argv = sys.argv[1:] if argv is None else argv
        return study_clicks.main_hard(args, sys.modules[__name__], schedule, train_params, deadline, log)
    args.arms = args.arms or "uncertainty,random"

    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/annotation_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "setup": {"region": REGION, "model": MODEL, "infer_task": TASK, "new_site": NEW_SITE,
                  "schedule": schedule, "pool": args.pool, "heldout_new_site": args.heldout,
                  "heldout_original": args.original, "replay_cases": args.replay, "train_params": train_params,
                  "seeds": site_seeds(args.repeat), "repeat": args.repeat,
                  "effort": "voxels differing from the truth; axial slices with any differing voxel"},
        "arms": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["summary"] = summarise(result)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        try:
            plot(result, args.out.with_suffix(".png"))
        except ImportError:
            log("matplotlib missing: no figure")

    with tempfile.TemporaryDirectory(prefix="mra-study-") as tmp:
        for arm in args.arms.split(","):
            root = Path(tmp) / arm
            root.mkdir()
            site = make_site(root, args.weights, args.pool, args.heldout, args.original, args.replay,
                             site_seeds(args.repeat))
            server = start_study_server(root, site, args.weights)
            try:
                from monailabel.client import MONAILabelClient

                client = MONAILabelClient(server.url, tmpdir=str(root / "client"))
                (root / "client").mkdir()
                if "start" not in result:
                    ev = evaluate(client, site)
                    result["start"] = {"new_site_dice": ev["new_site_dice"], "original_dice": ev["original_dice"],
                                       "heldout": ev}
                    # the served model never changes without fine-tuning: its held-out Dice stays the start's
                    result["no_finetuning"] = {"new_site_dice": ev["new_site_dice"],
                                               "original_dice": ev["original_dice"],
                                               "effort_voxels_per_case": ev["new_site_effort_voxels_per_case"]}
                    log(f"start: new-site Dice {ev['new_site_dice']}, original {ev['original_dice']}")
                    save()
                def partial(done: dict, arm=arm) -> None:
                    result["arms"][arm] = done
                    save()

                run_arm(client, site, arm, schedule, train_params, log=log, deadline=deadline, on_round=partial)
            finally:
                stop_study_server(server)
    save()
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
