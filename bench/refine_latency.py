"""Latency and memory of one click correction (issue 21) on a 256 x 256 x 40 image, probabilities cached.

    .venv/bin/python bench/refine_latency.py [--clicks 10] [--out bench/results/refine_latency.json]

An abdominal phantom (seed 31337) at the demo model's contrast ("original") and at the T1 site (the model
misses most organs) is resampled to 256 x 256 x 40 (1.18 x 0.90 x 4.2 mm), segmented once by the demo
abdomen model with probabilities, and kept in a :class:`ProbabilityCache`. Per structure, the simulated
annotator clicks (deepest voxel of the largest error region, up to ``--clicks``), and each interaction is
timed twice: ``refine()`` alone (engine) and as the server's task does it (read the NIfTI, refine from the
cached uint8 maps, write the .nrrd Slicer asks for). Memory: bytes the cache holds per image, and the
peak of Python allocations (tracemalloc) during one interaction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (256, 256, 40)


def _deepest_error(pred, truth, spacing):
    err = pred ^ truth
    lab, n = ndimage.label(err)
    if not n:
        return None
    comp = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    dt = ndimage.distance_transform_edt(np.pad(comp, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    p = tuple(int(v) for v in np.unravel_index(np.argmax(dt), dt.shape))
    return p, bool(truth[p])


def _resampled(ph):
    data = np.asarray(ph.image.dataobj).astype(np.float32)
    zoom = [t / s for t, s in zip(SHAPE, data.shape, strict=True)]
    image = np.rint(ndimage.zoom(data, zoom, order=1)).astype(np.int16)
    labels = ndimage.zoom(np.asarray(ph.labels.dataobj), zoom, order=0)
    affine = ph.image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(zoom)
    return nib.Nifti1Image(image, affine), labels


def run_case(seg, ph, clicks: int, tmp: Path) -> dict:
    from mrannotator.catalogue import load_catalogue
    from mrannotator.imageio import load_image, to_sitk
    from mrannotator.orientation import voxel_spacing
    from mrannotator.probcache import ProbabilityCache
    from mrannotator.refine import refine
    from mrannotator.refine_shape import long_axis_of

    cat = load_catalogue()
    img, truth = _resampled(ph)
    path = tmp / "image.nii.gz"
    nib.save(img, path)
    result = seg.segment(img, regions=["abdomen"], probabilities=True)
    cache = ProbabilityCache(max_bytes=2**31)
    cache.put("img", "v", result.probabilities, np.asanyarray(result.labels.dataobj))
    spacing = voxel_spacing(img.affine)
    axis = long_axis_of(img.affine)
    engine, task, peaks, dice = [], [], [], {}
    for sid in sorted(result.probabilities):
        t = truth == sid
        if not t.any():
            continue
        fg, bg = [], []
        cur = np.asanyarray(result.labels.dataobj).copy()
        for _ in range(clicks):
            c = _deepest_error(cur == sid, t, spacing)
            if c is None:
                break
            (fg if c[1] else bg).append(c[0])
            probs = cache.get("img", "v")
            t0 = time.perf_counter()
            cur = refine(np.asanyarray(img.dataobj), cur, probs[sid], sid, fg, bg, spacing=spacing, long_axis=axis)
            engine.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the server task's path: read the image, refine, write the result
            im = load_image(path)
            new = refine(np.asanyarray(im.dataobj), cur, probs[sid], sid, fg, bg, spacing=spacing, long_axis=axis)
            sitk.WriteImage(to_sitk(im, new), str(tmp / "out.nrrd"), useCompression=True)
            task.append(time.perf_counter() - t0)
            if len(peaks) < 3:
                tracemalloc.start()
                refine(np.asanyarray(img.dataobj), cur, probs[sid], sid, fg, bg, spacing=spacing, long_axis=axis)
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        dice[cat.by_id(sid).name] = round(float(2 * ((cur == sid) & t).sum() / max(1, (cur == sid).sum() + t.sum())), 4)
    return {"interactions": len(engine), "engine_p50_s": round(float(np.percentile(engine, 50)), 3),
            "engine_p95_s": round(float(np.percentile(engine, 95)), 3), "engine_max_s": round(max(engine), 3),
            "task_p95_s": round(float(np.percentile(task, 95)), 3), "task_max_s": round(max(task), 3),
            "cache_bytes_per_image": cache.nbytes, "structures_cached": len(result.probabilities),
            "refine_peak_alloc_mib": round(max(peaks) / 2**20, 1), f"dice_after_{clicks}_clicks": dice}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refine_latency.json")
    args = ap.parse_args(argv)
    from mrannotator import Segmenter
    from mrannotator.phantoms import make_phantom
    from mrannotator.sites import make_site_phantom

    seg = Segmenter(weights=ROOT / "models" / "demo", device="cpu", regions=["abdomen"])
    out = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
           "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "shape": list(SHAPE),
           "sites": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for site, ph in (("original", make_phantom("abdomen", seed=31337)),
                         ("t1", make_site_phantom("abdomen", seed=31337, site="t1"))):
            out["sites"][site] = run_case(seg, ph, args.clicks, Path(tmp))
            print(site, json.dumps(out["sites"][site]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
