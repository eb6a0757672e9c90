"""Evaluate the demo weights like the paper: held-out phantoms per region -> engine -> ``mrannotator evaluate``.

    python models/evaluate_demo.py [--weights models/demo] [--n 10] [--work .work/evaluate_demo]
                                   [--table models/demo/evaluation_heldout.md] [--device cpu]

For each phantom generator (abdomen, pelvis, prostate, shoulder, knee, spine) it makes ``--n`` phantoms
with held-out seeds (20000 + i: training uses seeds below 1,000 and the training script's held-out
measurement 10,000 and up), stored in a different orientation each, segments each with the engine
(the region's model only, as a user who knows the region would), writes prediction and truth label
maps to ``WORK/pred`` and ``WORK/truth``, and evaluates them with :func:`mrannotator.evaluation.evaluate`
on the structures the demo models serve (the phantoms also paint stomach and oesophagus, which no demo
model labels). All tables and the figure go to WORK; the Markdown report is copied to ``--table``.
The same evaluation can be repeated with ``mrannotator evaluate --pred WORK/pred --truth WORK/truth``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mrannotator.phantoms import GENERATORS

HERE = Path(__file__).resolve().parent
ORIENTATIONS = ("LAS", "RAS", "LPS", "sagittal", "coronal", "axial_reversed", "oblique")
SEED0 = 20_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(HERE / "demo"))
    ap.add_argument("--n", type=int, default=10, help="phantoms per generator")
    ap.add_argument("--work", default=str(HERE.parent / ".work" / "evaluate_demo"))
    ap.add_argument("--table", default=str(HERE / "demo" / "evaluation_heldout.md"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=GENERATORS,
                    help="phantom generators to run (default: all six; the committed table needs all)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the cases already in WORK (from earlier runs with other --generators) and evaluate "
                         "them together with these")
    args = ap.parse_args(argv)

    from mrannotator.engine import Segmenter
    from mrannotator.evaluation import evaluate, format_ci
    from mrannotator.imageio import save_nifti
    from mrannotator.phantoms import make_phantom

    work = Path(args.work)
    for sub in ("pred", "truth"):
        if not args.keep:
            shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg = Segmenter(weights=args.weights, device=args.device)
    served = [s.name for s in seg.structures]
    seconds = []
    for gen in args.generators:
        for i in range(args.n):
            seed, orientation = SEED0 + i, ORIENTATIONS[i % len(ORIENTATIONS)]
            case = f"{gen}_{seed}_{orientation}"
            ph = make_phantom(gen, seed=seed, orientation=orientation)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = seg.segment(ph.image, regions=[gen])
            seconds.append(result.seconds)
            save_nifti(ph.labels, work / "truth" / f"{case}.nii.gz")
            save_nifti(result.labels, work / "pred" / f"{case}.nii.gz")
            print(f"{case}: {result.seconds:.1f} s ({', '.join(result.models_run)})", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's notices about empty masks: those cases are reported as such
        ev = evaluate(work / "pred", work / "truth", structures=served,
                      set_name="held-out phantoms")
    done = sorted({p.name.split("_")[0] for p in (work / "truth").glob("*.nii.gz")}, key=GENERATORS.index)
    ev.settings["description"] = (
        f"Weights: {seg.weights.source} ({', '.join(m.dataset for m in seg.models)}); {args.n} held-out phantoms per "
        f"generator ({', '.join(done)}; seeds {SEED0}-{SEED0 + args.n - 1}, stored in {', '.join(ORIENTATIONS)} in "
        f"turn), segmented with the region's model on {args.device} (mean {np.mean(seconds):.1f} s per case in the "
        "last run); made by `python models/evaluate_demo.py`. Synthetic data measure the pipeline, not clinical "
        "accuracy."
    )
    ev.settings["structures"] = "those the demo models serve"
    paths = ev.write(work)
    table = Path(args.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths["markdown"], table)
    for r in ev.regions:
        dice = format_ci(r["dice_mean"], r["dice_ci_low"], r["dice_ci_high"])
        print(f"{r['region']:<16s} {r['cases']:>3d} cases  Dice {dice} [{r['ci_method']}]")
    print(f"{len(ev.skipped)} skipped entries; report {table}; tables and figure in {work}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
