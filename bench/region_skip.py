"""Region skipping: an all-regions call on a single-region phantom vs the matching model alone.

    python bench/region_skip.py [--runs 3] [--weights models/demo]

One process, models loaded once, one warm-up call per variant; medians of ``--runs`` calls. Also checks
that the labels equal those of all four models run without skipping. Each phantom is measured as made
(within one patch of every demo model) and inside a field of view 3 x 2 times larger in-plane (several
patches: there the coarse pass with non-overlapping tiles is cheaper than the real pass).

It also measures the floor of any presence check that uses the region models' own networks: for each
foreign model, its preprocessing (resampling to its spacing, normalisation) plus one forward pass of its
network on a single patch, and on a patch halved along every axis (the low-resolution check the issue
proposed; measured unsafe, see bench/README.md). If that floor alone exceeds 0.6x the matching model, no
check built on those networks can bring an all-regions call within 1.6x of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = {"abdomen": ["abdomen"], "prostate": ["prostate"], "knee": ["knee"], "spine": ["spine"]}


def median_time(fn, runs: int, sync=lambda: None) -> float:
    """Median seconds of ``runs`` calls after one warm-up; ``sync`` waits for the device (e.g. CUDA)."""
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def check_floor(seg, img, regions: list[str], runs: int) -> dict:
    """Seconds that the cheapest conceivable presence check of every foreign model costs (see module doc)."""
    import torch

    arr, affine = np.asarray(img.dataobj, np.float32), img.affine
    matching = {m.dataset for m in seg._select(regions, None)}
    prep = full = half = 0.0
    for m in seg.models:
        if m.dataset in matching:
            continue
        prep += median_time(lambda m=m: seg._preprocess(m, arr, affine), runs)
        net = m.predictor.network
        patch = list(m.predictor.configuration_manager.patch_size)
        # the network accepts any size divisible by its total pooling per axis
        div = np.prod(np.asarray(m.predictor.configuration_manager.pool_op_kernel_sizes), axis=0)
        small = [max(int(d), int(d) * round(p / 2 / d)) for p, d in zip(patch, div, strict=True)]
        for shape, acc in ((patch, "full"), (small, "half")):
            x = torch.zeros((1, 1, *shape))
            with torch.no_grad():
                t = median_time(lambda x=x, net=net: net(x), runs)
            if acc == "full":
                full += t
            else:
                half += t
    return {"foreign_preprocess_s": round(prep, 3), "foreign_one_patch_s": round(full, 3),
            "foreign_one_half_patch_s": round(half, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    from mrannotator import Segmenter
    from mrannotator.phantoms import in_larger_field_of_view, make_phantom

    plain = Segmenter(weights=args.weights, device="cpu")
    skipping = Segmenter(weights=args.weights, device="cpu", skip_absent_regions=True)

    rows = {}
    for gen, regions in [(f"{g}{v}", r) for g, r in CASES.items() for v in ("", "_large_fov")]:
        img = make_phantom(gen.replace("_large_fov", ""), seed=60_000).image
        if gen.endswith("_large_fov"):
            img = in_larger_field_of_view(img)
        full = plain.segment(img)
        sk = skipping.segment(img)
        alone = median_time(lambda img=img, regions=regions: plain.segment(img, regions=regions), args.runs)
        with_skip = median_time(lambda img=img: skipping.segment(img), args.runs)
        no_skip = median_time(lambda img=img: plain.segment(img), args.runs)
        rows[gen] = {
            "matching_model_alone_s": round(alone, 3), "all_regions_skipping_s": round(with_skip, 3),
            "all_regions_no_skipping_s": round(no_skip, 3), "ratio_skipping_vs_alone": round(with_skip / alone, 3),
            "skipped": sk.extra["skipped_absent"], "shape": list(img.shape),
            **check_floor(plain, img, regions, args.runs),
            "labels_identical_to_no_skipping": bool(np.array_equal(np.asarray(full.labels.dataobj),
                                                                   np.asarray(sk.labels.dataobj))),
        }
        r = rows[gen]
        r["ratio_floor_half_patch_check"] = round(
            (alone + r["foreign_preprocess_s"] + r["foreign_one_half_patch_s"]) / alone, 2)
        print(gen, r, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "region_skip.json").write_text(json.dumps({"rows": rows, "runs": args.runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
