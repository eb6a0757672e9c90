"""`mrannotator finetune` on the app's default schedule: the held-out lift behind issue 23's acceptance.

The suite's test (tests/test_finetune_cli.py) runs the same command on a 30-step schedule to keep the suite
short; this study runs it with the defaults the server's training uses (8 epochs x 25 iterations, learning
rate 1e-2): four new-site (T1-like) abdomen phantoms fine-tune the demo abdomen model, two held-out new-site
phantoms measure mean Dice before and after.

    .venv/bin/python bench/finetune_cli.py [--epochs 8 --iterations 25] [--out bench/results/finetune_cli.json]
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

import nibabel as nib
import numpy as np

from mrannotator import Segmenter
from mrannotator.cli import main as cli
from mrannotator.demo import dice_per_structure
from mrannotator.modelstore import ModelStore
from mrannotator.sites import make_site_phantom
from mrannotator.training import DEFAULT_EPOCHS, DEFAULT_ITERATIONS
from mrannotator.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEEDS, HELDOUT_SEEDS = (41_001, 41_002, 41_003, 41_004), (41_101, 41_102)  # as the suite's test


def mean_dice(weights, phantoms) -> float:
    segmenter = Segmenter(weights=weights, device="cpu", regions=["abdomen"])
    values = []
    for ph in phantoms:
        pred = np.asarray(segmenter.segment(ph.image, regions=["abdomen"]).labels.dataobj)
        values += list(dice_per_structure(np.asarray(ph.labels.dataobj), pred, sorted(ph.structures)).values())
    return float(np.mean(values))


def run(epochs: int, iterations: int, weights: Path, work: Path) -> dict:
    for sub in ("images", "labels"):
        (work / sub).mkdir()
    for seed in TRAIN_SEEDS:
        ph = make_site_phantom("abdomen", seed=seed, site="t1")
        nib.save(ph.image, work / "images" / f"case{seed}.nii.gz")
        nib.save(ph.labels, work / "labels" / f"case{seed}.nii.gz")
    heldout = [make_site_phantom("abdomen", seed=s, site="t1") for s in HELDOUT_SEEDS]
    before = mean_dice(weights, heldout)
    t0 = time.perf_counter()
    rc = cli(["finetune", "--images", str(work / "images"), "--labels", str(work / "labels"), "--out",
              str(work / "model"), "--weights", str(weights), "--regions", "abdomen", "--device", "cpu",
              "--epochs", str(epochs), "--iterations", str(iterations), "--quiet"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"mrannotator finetune exited {rc}")
    tuned, _, _ = ModelStore(work / "model").served_weights(load_weights(weights))
    after = mean_dice(tuned, heldout)
    return {"schedule": {"epochs": epochs, "iterations": iterations}, "train_cases": len(TRAIN_SEEDS),
            "heldout_cases": len(HELDOUT_SEEDS), "heldout_dice_before": round(before, 3),
            "heldout_dice_after": round(after, 3), "finetune_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_cli.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="finetune_cli.") as work:
        result = run(args.epochs, args.iterations, args.weights, Path(work))
    result.update({"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                   "load_average": [round(x, 2) for x in os.getloadavg()],
                   "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "command": " ".join([".venv/bin/python", "bench/finetune_cli.py", *(argv or sys.argv[1:])])})
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
