"""Region skipping: an all-regions call on a single-region phantom vs the matching model alone.

    python bench/region_skip.py [--runs 3] [--weights models/demo]

One process, models loaded once, one warm-up call per variant; medians of ``--runs`` calls. Also checks
that the labels equal those of all four models run without skipping. Each phantom is measured as made
(within one patch of every demo model) and inside a field of view 3 x 2 times larger in-plane (several
patches: there the coarse pass with non-overlapping tiles is cheaper than the real pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = {"abdomen": ["abdomen"], "prostate": ["prostate"], "knee": ["knee"], "spine": ["spine"]}


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    from mrannotator import Segmenter
    from mrannotator.phantoms import make_phantom

    plain = Segmenter(weights=args.weights, device="cpu")
    skipping = Segmenter(weights=args.weights, device="cpu", skip_absent_regions=True)

    rows = {}
    for gen, regions in [(f"{g}{v}", r) for g, r in CASES.items() for v in ("", "_large_fov")]:
        img = make_phantom(gen.replace("_large_fov", ""), seed=60_000).image
        if gen.endswith("_large_fov"):
            d = np.asarray(img.dataobj)
            big = np.zeros((3 * d.shape[0], 2 * d.shape[1], d.shape[2]), d.dtype) + d.min()
            big[: d.shape[0], : d.shape[1]] = d
            img = nib.Nifti1Image(big, img.affine)
        full = plain.segment(img)
        sk = skipping.segment(img)
        alone = median_time(lambda img=img, regions=regions: plain.segment(img, regions=regions), args.runs)
        with_skip = median_time(lambda img=img: skipping.segment(img), args.runs)
        no_skip = median_time(lambda img=img: plain.segment(img), args.runs)
        rows[gen] = {
            "matching_model_alone_s": round(alone, 3), "all_regions_skipping_s": round(with_skip, 3),
            "all_regions_no_skipping_s": round(no_skip, 3), "ratio_skipping_vs_alone": round(with_skip / alone, 3),
            "skipped": sk.extra["skipped_absent"], "shape": list(img.shape),
            "labels_identical_to_no_skipping": bool(np.array_equal(np.asarray(full.labels.dataobj),
                                                                   np.asarray(sk.labels.dataobj))),
        }
        print(gen, rows[gen], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "region_skip.json").write_text(json.dumps({"rows": rows, "runs": args.runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
