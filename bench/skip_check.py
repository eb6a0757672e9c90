"""Region skipping on any device: labels, network calls per model and times, skipping vs not (demo weights).

    python bench/skip_check.py [--device cuda] [--real-mr ../shared/data/real_mr/example_mr_sm.nii.gz]

Four phantoms, a knee phantom in a 6x field of view and the real MR sample; all four models with and without
``skip_absent_regions``; network calls counted by forward hooks (a model that runs must call its network as
often as without skipping); medians of 3 after a warm-up. Prints one JSON line last.
"""

import argparse
import json

import nibabel as nib
import numpy as np
import torch
from region_skip import median_time

from mrannotator import Segmenter
from mrannotator.performance import count_network_calls
from mrannotator.phantoms import in_larger_field_of_view, make_phantom

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--real-mr", default="../shared/data/real_mr/example_mr_sm.nii.gz")
args = ap.parse_args()
dev = args.device
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
plain = Segmenter(device=dev)
skip = Segmenter(device=dev, skip_absent_regions=True)

cases = {r: make_phantom(r, seed=20_501).image for r in ("abdomen", "prostate", "knee", "spine")}
cases["knee_large_fov"] = in_larger_field_of_view(make_phantom("knee", seed=20_502).image)
cases["real_mr"] = nib.load(args.real_mr)


def calls_and_result(seg, img):
    with count_network_calls(seg) as n:
        return n, seg.segment(img)


def med(fn):
    return round(median_time(fn, 3, sync), 3)


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
