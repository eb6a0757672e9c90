"""Region skipping on any device: labels, network calls per model and times, skipping vs not (demo weights).

    python bench/skip_check.py [--device cuda] [--real-mr ../shared/data/real_mr/example_mr_sm.nii.gz]

Four phantoms, a knee phantom in a 6x field of view and the real MR sample; all four models with and without
``skip_absent_regions``; network calls counted by forward hooks (a model that runs must call its network as
often as without skipping); medians of 3 after a warm-up. Prints one JSON line last.
"""

import argparse
import json
import statistics
import time
from collections import Counter

import nibabel as nib
import numpy as np
import torch

from mrannotator import Segmenter
from mrannotator.phantoms import make_phantom

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--real-mr", default="../shared/data/real_mr/example_mr_sm.nii.gz")
args = ap.parse_args()
dev = args.device
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
plain = Segmenter(device=dev)
skip = Segmenter(device=dev, skip_absent_regions=True)


def big(img):
    d = np.asarray(img.dataobj)
    b = np.zeros((3 * d.shape[0], 2 * d.shape[1], d.shape[2]), d.dtype) + d.min()
    b[: d.shape[0], : d.shape[1]] = d
    return nib.Nifti1Image(b, img.affine)


cases = {r: make_phantom(r, seed=20_501).image for r in ("abdomen", "prostate", "knee", "spine")}
cases["knee_large_fov"] = big(make_phantom("knee", seed=20_502).image)
cases["real_mr"] = nib.load(args.real_mr)


def calls_and_result(seg, img):
    n = Counter()
    hooks = [m.predictor.network.register_forward_hook(lambda mod, i, o, d=m.dataset: n.update([d]))
             for m in seg.models]
    try:
        return n, seg.segment(img)
    finally:
        for h in hooks:
            h.remove()


def med(fn, runs=3):
    fn()
    ts = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts), 3)


out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__, "rows": {}}
for name, img in cases.items():
    pc, pr = calls_and_result(plain, img)
    sc, sr = calls_and_result(skip, img)
    out["rows"][name] = {
        "labels_identical": bool(np.array_equal(np.asarray(pr.labels.dataobj), np.asarray(sr.labels.dataobj))),
        "skipped": sr.extra.get("skipped_absent"), "calls_plain": dict(pc), "calls_skipping": dict(sc),
        "run_models_same_calls": all(sc[d] == pc[d] for d in sr.models_run),
        "no_skip_s": med(lambda img=img: plain.segment(img)), "skip_s": med(lambda img=img: skip.segment(img)),
    }
    print(name, out["rows"][name], flush=True)
print(json.dumps(out))
