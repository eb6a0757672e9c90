"""Full-size network timing: stock nnU-Net vs the engine (exact and fast) on one real-size MR volume.

    python bench/fullsize.py [--runs 3] [--variants stock_inprocess engine_exact engine_fast stock_cli]

Builds a full-size 3d_fullres network the way a real multi-organ MR model is built: nnU-Net's own
fingerprint + ExperimentPlanner on a synthetic dataset of 320x320x40 MR volumes at 0.75x0.75x4 mm
(8 classes), random weights (for timing only), saved in the release layout. Each variant runs in a
fresh process, ``--runs`` times; the prediction call alone is timed; peak RSS is the process's.
Labels of engine_exact are compared with stock_inprocess voxel for voxel; engine_fast reports the
share of voxels whose label changed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (320, 320, 40)
SPACING = (0.75, 0.75, 4.0)
N_CLASSES = 8


def build(work: Path) -> tuple[Path, Path]:
    """(model folder, test volume) for the full-size network."""
    raw, pre = work / "raw", work / "pre"
    for k, v in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", work / "res")):
        v.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(v)
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ds = raw / "Dataset900_FullSize"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    aff = np.diag([*SPACING, 1.0])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"), -1)
    for c in range(3):
        lab = np.zeros(SHAPE, np.uint8)
        for k in range(1, N_CLASSES + 1):
            ctr = rng.uniform(-0.6, 0.6, 3)
            lab[(((grid - ctr) / rng.uniform(0.1, 0.3, 3)) ** 2).sum(-1) < 1] = k
        img = (lab * 60 + rng.normal(300, 40, SHAPE)).astype(np.int16)
        nib.save(nib.Nifti1Image(img, aff), ds / "imagesTr" / f"c{c}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), ds / "labelsTr" / f"c{c}.nii.gz")
    dj = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, **{f"class{k}": k for k in range(1, 9)}},
          "numTraining": 3, "file_ending": ".nii.gz",
          "overwrite_image_reader_writer": "NibabelIO"}  # no SimpleITK needed (the GPU machine lacks it)
    (ds / "dataset.json").write_text(json.dumps(dj))
    extract_fingerprints([900], num_processes=2)
    plan_experiments([900])
    plans = json.loads((pre / ds.name / "nnUNetPlans.json").read_text())
    model = work / "models" / ds.name / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    (model / "dataset.json").write_text(json.dumps(dj))
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainerNoMirroring.build_network_architecture(pm, cm, 1, N_CLASSES + 1, enable_deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerNoMirroring",
                "init_args": {"configuration": "3d_fullres", "fold": 0}, "inference_allowed_mirroring_axes": None},
               model / "fold_0" / "checkpoint_final.pth")
    vol = work / "volume_0000.nii.gz"
    # LAS storage, as the release expects
    las = nib.Nifti1Image(np.asarray(nib.load(ds / "imagesTr" / "c0_0000.nii.gz").dataobj)[::-1].copy(),
                          np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0]))
    nib.save(las, vol)
    n_params = sum(p.numel() for p in net.parameters())
    (work / "network.json").write_text(json.dumps({"patch_size": cm.patch_size, "params": n_params,
                                                   "features": cm.network_arch_init_kwargs["features_per_stage"]}))
    return model, vol


CHILD = {
    "stock_inprocess": """
import torch, numpy as np, nibabel as nib, time
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
p = nnUNetPredictor(tile_step_size=0.5, device=torch.device('cpu'), allow_tqdm=False)
p.initialize_from_trained_model_folder(MODEL, use_folds=(0,))
img = nib.load(VOL); x = np.asarray(img.dataobj).transpose(2, 1, 0)[None]
t = time.perf_counter()
seg = p.predict_single_npy_array(x, {'spacing': list(img.header.get_zooms())[::-1]})
DT = time.perf_counter() - t
LABELS = seg.transpose(2, 1, 0)
""",
    "engine_exact": """
import time, numpy as np
from mrannotator import Segmenter
s = Segmenter(weights=WEIGHTS, device='cpu', mode='exact')
t = time.perf_counter(); r = s.segment(VOL); DT = time.perf_counter() - t
LABELS = np.asarray(r.labels.dataobj)
""",
    "engine_fast": """
import time, numpy as np
from mrannotator import Segmenter
s = Segmenter(weights=WEIGHTS, device='cpu', mode='fast')
t = time.perf_counter(); r = s.segment(VOL); DT = time.perf_counter() - t
LABELS = np.asarray(r.labels.dataobj)
""",
}


def run_child(variant: str, model: Path, vol: Path, out: Path) -> tuple[float, float]:
    if variant == "stock_cli":
        inp = vol.parent / "cli_in"
        inp.mkdir(exist_ok=True)
        if not (inp / vol.name).exists():
            (inp / vol.name).symlink_to(vol)
        env = {**os.environ, "nnUNet_results": str(model.parents[1])}
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inp), "-o", str(out),
                        "-d", "900", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerNoMirroring", "-device",
                        "cpu", "--disable_progress_bar"], env=env, check=True, capture_output=True)
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    code = (f"MODEL={str(model)!r}; WEIGHTS={str(model.parents[1])!r}; VOL={str(vol)!r}\n" + CHILD[variant]
            + f"\nnp.save({str(out)!r}, LABELS.astype(np.uint8))\nimport resource\n"
            "print(DT, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    dt, rss = r.stdout.strip().splitlines()[-1].split()
    return float(dt), float(rss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["stock_inprocess", "engine_exact", "engine_fast"])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mra-fullsize-"))
    model, vol = build(work)
    print("network:", (work / "network.json").read_text(), flush=True)
    rows, labels = {}, {}
    for v in args.variants:
        res = []
        for k in range(args.runs):
            res.append(run_child(v, model, vol, work / f"{v}_{k}.npy" if v != "stock_cli" else work / "cli_out"))
        rows[v] = {"median_s": round(statistics.median(r[0] for r in res), 2), "runs_s": [round(r[0], 2) for r in res],
                   "peak_rss_mib": round(max(r[1] for r in res))}
        if v != "stock_cli":
            labels[v] = np.load(work / f"{v}_0.npy")
        print(v, rows[v], flush=True)
    if "stock_inprocess" in rows:
        base = rows["stock_inprocess"]["median_s"]
        for v in rows:
            rows[v]["ratio_vs_stock_inprocess"] = round(rows[v]["median_s"] / base, 3)
        # the engine serves the unknown labels class1..class8 as uncatalogued ids 200..207
        stock = labels["stock_inprocess"]
        stock_ids = np.where(stock > 0, stock + 199, 0).astype(np.uint8)
        for v in ("engine_exact", "engine_fast"):
            if v in labels:
                rows[v]["voxels_differing_from_stock"] = int((labels[v] != stock_ids).sum())
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "network": json.loads((work / "network.json").read_text()), "shape": SHAPE,
              "spacing": SPACING, "runs": args.runs, "cpu_count": os.cpu_count()}
    (args.out / "fullsize.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
