"""Is the fine-tuning schedule what holds study v2 below 0.85 on the hard site? (issue 21)

Study v2 (``bench/annotation_study.py --hard-site hard_t1``) ends at new-site Dice 0.71-0.84 after 24 labelled
cases, fine-tuning 8 x 25 iterations per round (the app's default, chosen on the easy site). This bench takes the
annotator out of the loop: the demo abdomen model is fine-tuned with ``mrannotator finetune`` on all 24 pool
cases of the study's hard site with their truths (what the annotator ends up saving) plus the study's 8
original-contrast replay cases, in stages of ``--epochs`` x ``--iterations`` (each stage restarts the learning
rate from the version the last one published, as the server's rounds do), and the held-out sets of the study
(8 new-site, 8 original-contrast phantoms; same seeds as study repeat ``--repeat``) are segmented after every
stage. If the new-site Dice keeps rising past 0.85 with more steps, the schedule is what holds the study back; if
it levels off below, the model (its size, the site's 4.5 x 4.5 x 8 mm grid) is.

    .venv/bin/python bench/hard_site_schedule.py [--stages 8] [--epochs 8 --iterations 25] [--repeat 0]

Writes ``bench/results/hard_site_schedule.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import annotation_study as study  # noqa: E402


def heldout_dice(weights, cases, structures) -> dict:
    """The study's measure: per case the mean Dice over the served model's structures; then per structure."""
    from mrannotator import Segmenter

    segmenter = Segmenter(weights=weights, device="cpu", regions=[study.REGION])
    per_case = []
    for case in cases:
        pred = np.asarray(segmenter.segment(str(case.image), regions=[study.REGION]).labels.dataobj)
        per_case.append(study.dice_per_structure(study._labels(case.truth), pred, structures))
    names = list(structures.values())
    return {"dice": round(float(np.mean([np.mean(list(c.values())) for c in per_case])), 4),
            "per_structure": {n: round(float(np.mean([c[n] for c in per_case])), 4) for n in names}}


def run(args, work: Path) -> dict:
    from mrannotator.cli import main as cli
    from mrannotator.modelstore import ModelStore
    from mrannotator.weights import load_weights

    site = study.make_site(work / "site", args.weights, args.pool, args.heldout, args.original, args.replay,
                           seeds=study.site_seeds(args.repeat), new_site=args.site)
    images, labels = work / "images", work / "labels"
    for d in (images, labels):
        d.mkdir()
    for case in site.pool + site.replay:  # every pool case labelled (the study's 24 after round 4) + replay
        (images / f"{case.name}.nii.gz").symlink_to(case.image)
        (labels / f"{case.name}.nii.gz").symlink_to(case.truth)
    pretrained = load_weights(args.weights)

    def measure(weights, steps: int, seconds: float) -> dict:
        new = heldout_dice(weights, site.heldout_new, site.structures)
        orig = heldout_dice(weights, site.heldout_original, site.structures)
        row = {"steps": steps, "new_site_dice": new["dice"], "original_dice": orig["dice"],
               "new_site_per_structure": new["per_structure"], "train_seconds": round(seconds, 1)}
        print(f"{steps:5d} steps: new-site {new['dice']:.4f}, original {orig['dice']:.4f} "
              f"({seconds:.0f} s training) {new['per_structure']}", flush=True)
        return row

    rows = [measure(pretrained, 0, 0.0)]
    store = work / "model"
    for stage in range(1, args.stages + 1):
        t0 = time.perf_counter()
        rc = cli(["finetune", "--images", str(images), "--labels", str(labels), "--out", str(store),
                  "--weights", str(args.weights), "--regions", study.REGION, "--device", "cpu",
                  "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--quiet"])
        if rc != 0:
            raise SystemExit(f"mrannotator finetune exited {rc} at stage {stage}")
        tuned, _, _ = ModelStore(store).served_weights(pretrained)
        rows.append(measure(tuned, stage * args.epochs * args.iterations, time.perf_counter() - t0))
    return {"site": args.site, "repeat": args.repeat, "train_cases": {"new_site": len(site.pool),
            "replay_original": len(site.replay)}, "heldout": {"new_site": len(site.heldout_new),
            "original": len(site.heldout_original)},
            "stage": {"epochs": args.epochs, "iterations": args.iterations, "learning_rate": study.TRAIN_PARAMS[
                "learning_rate"]}, "stages": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="hard_t1")
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=study.TRAIN_PARAMS["max_epochs"])
    ap.add_argument("--iterations", type=int, default=study.TRAIN_PARAMS["iterations"])
    ap.add_argument("--repeat", type=int, default=0, help="the study repeat whose seeds to use")
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--original", type=int, default=8)
    ap.add_argument("--replay", type=int, default=8)
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hard_site_schedule.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hard_site_schedule.") as work:
        result = run(args, Path(work))
    result.update({"seconds": round(time.perf_counter() - t0, 1),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                   "load_average": [round(x, 2) for x in os.getloadavg()],
                   "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "command": " ".join([".venv/bin/python", "bench/hard_site_schedule.py", *(argv or sys.argv[1:])])})
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
