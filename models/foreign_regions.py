"""How much each region model labels on phantoms of the other regions (it should label nothing).

    python models/foreign_regions.py [--weights models/demo] [--n 5] [--table models/demo/foreign_regions.md]

An "all regions" call runs every region model on the image, so a model that paints structures on anatomy
it was never meant for puts false structures into the merged result (and stops region skipping from
skipping it). For each model and each phantom generator of another region, ``--n`` held-out phantoms
(seeds 30000 + i, never trained on) are segmented by that model alone at full resolution; the table gives
the median and maximum number of foreground voxels per phantom, and how many phantoms got none at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mrannotator.phantoms import GENERATORS

HERE = Path(__file__).resolve().parent
SEED0 = 30_000


def measure(weights: Path, n: int) -> list[dict]:
    from mrannotator import Segmenter
    from mrannotator.phantoms import make_phantom

    seg = Segmenter(weights=weights, device="cpu")
    phantoms = {g: [make_phantom(g, seed=SEED0 + i) for i in range(n)] for g in GENERATORS}
    rows = []
    for m in seg.models:
        own = set(m.folder.regions())
        for gen, cases in phantoms.items():
            if set(cases[0].structures) & {s.id for s in m.structures.values()}:
                continue  # this model's own region
            counts = [int((np.asarray(seg.segment(p.image, regions=sorted(own)).labels.dataobj) > 0).sum())
                      for p in cases]
            rows.append({"model": m.dataset, "phantoms": gen, "n": len(counts), "median": float(np.median(counts)),
                         "max": max(counts), "silent": sum(c == 0 for c in counts)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=HERE / "demo")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--table", type=Path, default=HERE / "demo" / "foreign_regions.md")
    args = ap.parse_args(argv)
    rows = measure(args.weights, args.n)
    lines = ["# Region models on phantoms of other regions", "",
             f"`python models/foreign_regions.py --n {args.n}`: foreground voxels that each region model paints on "
             f"held-out phantoms (seeds {SEED0}+) of regions it does not cover, full resolution, exact mode. "
             "Ideal: 0.", "",
             "| model | phantoms of | n | median voxels | max voxels | phantoms with none |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['phantoms']} | {r['n']} | {r['median']:g} | {r['max']} | {r['silent']} |"
              for r in rows]
    args.table.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
