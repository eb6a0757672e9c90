"""GPU figures (issue 6): the full-size network and the demo weights on a CUDA device.

    python bench/gpu.py --out DIR [--runs 3] [--variants ...] [--cpu-labels FILE]

Meant for the GPU machine that is sometimes lent (command and figures in bench/README.md). Each variant
runs in a fresh process: load the models, one warm-up call (reported as ``first_call_s``: cuDNN
autotuning, torch.compile), then ``--runs`` timed calls; median, peak GPU memory. The image is handed
over in memory, so only preprocessing, prediction and export are timed, as for stock.

- ``full_*``: the full-size network bench/fullsize.py builds (random weights, timing only); labels of
  each engine variant are compared with stock ``nnUNetPredictor`` on the same GPU.
- ``demo_*``: all four demo region models on the real MR sample; fp16 / bf16 per-class Dice against
  exact, and exact on the GPU against exact on the CPU when ``--cpu-labels`` gives the CPU's labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FULL = ["full_stock_fp32", "full_engine_exact", "full_engine_fp16", "full_engine_bf16"]
DEMO = ["demo_exact", "demo_fp16", "demo_bf16"]
COMPILE = ["full_engine_exact_compile", "full_engine_fp16_compile"]  # last: compiling may take minutes


def child(variant: str, weights: str, vol: str, runs: int, labels_out: str, device: str) -> dict:
    import nibabel as nib
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if variant.endswith("_compile"):
        os.environ["nnUNet_compile"] = "1"
    img = nib.load(vol)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)  # decoded once, outside the timing
    if variant.startswith("full_stock"):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        model = next(Path(weights).glob("*/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"))
        p = nnUNetPredictor(tile_step_size=0.5, device=torch.device(device), allow_tqdm=False,
                            perform_everything_on_device=cuda)
        p.initialize_from_trained_model_folder(str(model), use_folds=(0,))
        if "_det" in variant:  # nnUNetPredictor turns cuDNN autotuning on; off for a reproducible run
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        x = np.asarray(img.dataobj).transpose(2, 1, 0)[None]
        props = {"spacing": [float(z) for z in img.header.get_zooms()][::-1]}

        def call():
            return p.predict_single_npy_array(x, props).transpose(2, 1, 0)
    else:
        from mrannotator import Segmenter

        mode = "fast" if "fp16" in variant else "exact"
        s = Segmenter(weights=weights, device=device, mode=mode)
        if "bf16" in variant:
            s.mode, s._autocast = "fast (bf16)", torch.autocast(device, dtype=torch.bfloat16)
        if "_det" in variant:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

        def call():
            return np.asarray(s.segment(img).labels.dataobj)

    t = time.perf_counter()
    labels = call()
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t)
    np.save(labels_out, labels.astype(np.uint8))
    return {"first_call_s": round(first, 3), "runs_s": [round(x, 3) for x in times],
            "median_s": round(statistics.median(times), 3),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for c in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0}):
        x, y = a == c, b == c
        out[int(c)] = round(float(2 * (x & y).sum() / max(int(x.sum() + y.sum()), 1)), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=FULL + DEMO + COMPILE)
    ap.add_argument("--demo-image", default=str(ROOT.parent / "shared/data/real_mr/example_mr_sm.nii.gz"))
    ap.add_argument("--cpu-labels", type=Path, default=None, help="exact labels of the demo image made on CPU (.npy)")
    ap.add_argument("--device", default="cuda", help="cuda (the point of this bench) or cpu (to try the script)")
    ap.add_argument("--work", type=Path, default=None, help="build folder (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "WEIGHTS", "VOL", "LABELS_OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        v, w, vol, lab = args.child
        print("RESULT " + json.dumps(child(v, w, vol, args.runs, lab, args.device)), flush=True)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="mra-gpu-"))
    result: dict = {"rows": {}}
    if any(v.startswith("full_") for v in args.variants):
        import fullsize

        t = time.perf_counter()
        model, vol = fullsize.build(work)
        result["network"] = json.loads((work / "network.json").read_text())
        print(f"built full-size network in {time.perf_counter() - t:.0f} s: {result['network']}", flush=True)
    for v in args.variants:
        weights, image = (str(model.parents[1]), str(vol)) if v.startswith("full_") else (
            str(ROOT / "models" / "demo"), args.demo_image)
        lab = work / f"{v}.npy"
        try:
            r = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--out", str(args.out),
                                "--device", args.device, "--child", v, weights, image, str(lab)],
                               capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(line[-1][7:]) if line else {"error": r.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout} s"}
        result["rows"][v] = row
        print(v, json.dumps(row), flush=True)
        (args.out / "gpu.json").write_text(json.dumps(result, indent=2))

    rows = result["rows"]
    stock = work / "full_stock_fp32.npy"
    if "median_s" in rows.get("full_stock_fp32", {}):
        s_lab = np.load(stock)
        s_ids = np.where(s_lab > 0, s_lab + 199, 0)  # the engine serves class1..8 as uncatalogued ids 200..207
        for v in FULL[1:] + COMPILE:
            if "median_s" in rows.get(v, {}):
                rows[v]["ratio_vs_stock"] = round(rows[v]["median_s"] / rows["full_stock_fp32"]["median_s"], 3)
                rows[v]["voxels_differing_from_stock"] = int((np.load(work / f"{v}.npy") != s_ids).sum())
    for a, b in (("full_stock_fp32", "full_stock_fp32_again"), ("full_stock_det", "full_stock_det_again"),
                 ("full_stock_det", "full_engine_exact_det")):
        if "median_s" in rows.get(a, {}) and "median_s" in rows.get(b, {}):
            la, lb = np.load(work / f"{a}.npy"), np.load(work / f"{b}.npy")
            if b.startswith("full_engine"):
                la = np.where(la > 0, la + 199, 0)
            rows[b][f"voxels_differing_from_{a}"] = int((la != lb).sum())
    if "median_s" in rows.get("demo_exact", {}):
        ex = np.load(work / "demo_exact.npy")
        for v in ("demo_fp16", "demo_bf16"):
            if "median_s" in rows.get(v, {}):
                d = dice_per_class(ex, np.load(work / f"{v}.npy"))
                rows[v]["dice_vs_exact_min"] = min(d.values()) if d else None
                rows[v]["dice_vs_exact"] = d
        if args.cpu_labels and args.cpu_labels.exists():
            cpu = np.load(args.cpu_labels)
            rows["demo_exact"]["voxels_differing_from_cpu_exact"] = int((cpu != ex).sum())
            rows["demo_exact"]["dice_vs_cpu_exact"] = dice_per_class(cpu, ex)
    for f in work.glob("*.npy"):
        f.unlink()
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
