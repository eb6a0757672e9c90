"""Train the MRAnnotator demo weights: four real nnU-Net v2 models on synthetic MR phantoms.

    python models/make_demo_weights.py [--out models/demo] [--work DIR] [--datasets 1 2 3 4] [--epochs N]

For each dataset of the public release (001 Abdomen, 002 ShoulderKnee, 003 PelvisProstate, 004 Spine)
this makes LAS-stored phantoms with the official label names, then runs nnU-Net v2's own pipeline:
fingerprint extraction, the default experiment planner, the default preprocessor and the
``nnUNetTrainerNoMirroring`` trainer (3d_fullres, fold 0) on the CPU. Two changes keep it small and
CPU-trainable, and both are recorded in the exported plans.json under ``mrannotator_demo``:

- the planned U-Net keeps its stages, kernels and strides but gets 8-16-32-64(-64...) features;
- the patch covers the whole (median) phantom and the batch size is 2;
- the trainer runs a short schedule: a subclass of ``nnUNetTrainerNoMirroring`` that lowers
  ``num_epochs`` and the iterations per epoch and uses AdamW at 3e-3 (as nnU-Net's own
  ``nnUNetTrainerAdam``); the checkpoint names ``nnUNetTrainerNoMirroring``, whose network and
  inference are identical.

The result is laid out exactly like the official release
(``DatasetXXX/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/{dataset.json,plans.json,fold_0/
checkpoint_final.pth}``) with a slim checkpoint (network weights and what the predictor reads).
Each model is then measured on held-out phantoms (seeds never used in training), and the per-class
Dice is written next to the weights (``heldout_dice.json``) and summarised in ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
TRAINER = "nnUNetTrainerNoMirroring"
FOLDER = f"{TRAINER}__nnUNetPlans__3d_fullres"

# dataset id -> (name, official labels in dataset.json order, [(phantom generator, n_train, n_test)], epochs)
DATASETS = {
    1: ("Abdomen",
        ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "aorta", "inferior vena cava",
         "pancreas"],
        [("abdomen", 14, 6)], 30),
    2: ("ShoulderKnee",
        ["femur", "patella", "fibula", "tibia", "humerus_right", "clavicle_right", "scapula_right",
         "humerus_left", "clavicle_left", "scapula_left"],
        [("shoulder", 10, 5), ("knee", 10, 5)], 30),
    3: ("PelvisProstate",
        ["upper_femora", "pelvis", "sacrum", "prostate"],
        [("pelvis", 10, 5), ("prostate", 6, 5)], 30),
    4: ("Spine",
        [f"Vertebrae {lv}" for lv in
         [f"C{i}" for i in range(3, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]],
        [("spine", 14, 6)], 40),
}
TEST_SEED_OFFSET = 10_000  # held-out phantoms use seeds from here on; training seeds are below 1,000
N_VAL = 2


def dataset_json(labels: list[str], n: int) -> dict:
    return {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(labels)}},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": "MRAnnotator demo (synthetic MR phantoms)",
        "reference": "mrannotator.phantoms; not for clinical use",
        "licence": "Apache-2.0 (demo weights trained by the MRAnnotator project)",
    }


NEGATIVE_SEED = 500  # negatives use training seeds 500+ (held-out phantoms start at TEST_SEED_OFFSET)


def write_raw(raw: Path, did: int, negatives: int = 0) -> dict:
    """Training cases: the dataset's own phantoms, plus ``negatives`` phantoms of every other region.

    A negative is another region's phantom whose labels are all background for this model (none of its
    structures are this model's): it teaches a region model that a scan of another region holds none of
    its structures, as the official models learnt from real scans whose field of view shows other anatomy.
    """
    from mrannotator.phantoms import GENERATORS, make_phantom, to_model_labels

    name, labels, gens, _ = DATASETS[did]
    own = {g for g, _, _ in gens}
    gens = list(gens) + [(g, negatives, 0) for g in GENERATORS if g not in own and negatives]
    ds = raw / f"Dataset{did:03d}_{name}"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    dj = dataset_json(labels, 0)
    n = 0
    for gen, n_train, _ in gens:
        for k in range(n_train):
            seed = k if gen in own else NEGATIVE_SEED + k
            ph = make_phantom(gen, seed=seed, orientation="LAS")
            case = f"{gen}{seed:03d}" if gen in own else f"neg{gen}{seed:03d}"
            nib.save(ph.image, ds / "imagesTr" / f"{case}_0000.nii.gz")
            lab = to_model_labels(np.asarray(ph.labels.dataobj), dj["labels"])
            nib.save(nib.Nifti1Image(lab, ph.labels.affine, ph.labels.header), ds / "labelsTr" / f"{case}.nii.gz")
            n += 1
    dj["numTraining"] = n
    (ds / "dataset.json").write_text(json.dumps(dj, indent=2))
    return dj


def shrink_plans(plans_file: Path) -> dict:
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    n_stages = kw["n_stages"]
    kw["features_per_stage"] = [min(8 * 2**i, 64) for i in range(n_stages)]
    # patch: the whole median image, rounded up to what the strides need per axis
    div = np.prod(np.asarray(kw["strides"]), axis=0)
    median = np.asarray(cfg["median_image_size_in_voxels"], float)
    cfg["patch_size"] = [int(math.ceil(m / d) * d) for m, d in zip(median, div, strict=True)]
    cfg["batch_size"] = 2
    plans["mrannotator_demo"] = {
        "note": "MRAnnotator demo weights: nnU-Net's planned architecture with shrunken features, "
                "whole-phantom patch, batch 2, short schedule; trained on synthetic MR phantoms",
        "features_per_stage": kw["features_per_stage"],
        "patch_size": cfg["patch_size"],
    }
    plans_file.write_text(json.dumps(plans, indent=2))
    return plans


def make_trainer_class(epochs: int):
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    class nnUNetTrainerNoMirroringDemo(nnUNetTrainerNoMirroring):  # noqa: N801 (nnU-Net naming)
        """nnUNetTrainerNoMirroring with a CPU-sized schedule (same network, loss and augmentation)."""

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            import torch

            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = epochs
            self.num_iterations_per_epoch = 25
            self.num_val_iterations_per_epoch = 5
            self.save_every = 10**9  # only the final checkpoint
            self.initial_lr = 3e-3

        def configure_optimizers(self):
            # AdamW (as nnU-Net's own nnUNetTrainerAdam) instead of SGD: it learns the small phantom
            # organs within a CPU-sized schedule, where SGD at 1e-2 only found the liver in 20 epochs
            import torch
            from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

            opt = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                    amsgrad=True)
            return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

    return nnUNetTrainerNoMirroringDemo


def train(did: int, epochs: int, init_from: Path | None = None) -> Path:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    name = DATASETS[did][0]
    extract_fingerprints([did], num_processes=2, check_dataset_integrity=True)
    plan_experiments([did])
    pre = Path(nnUNet_preprocessed) / f"Dataset{did:03d}_{name}"
    if init_from is not None:  # continuing: keep the exported model's plans (the network must not change)
        plans = json.loads((init_from / "plans.json").read_text())
        (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
        shutil.copy(init_from / "dataset_fingerprint.json", pre / "dataset_fingerprint.json")  # what planned it
    else:
        plans = shrink_plans(pre / "nnUNetPlans.json")
    preprocess([did], configurations=("3d_fullres",), num_processes=(2,))
    labels_tr = Path(os.environ["nnUNet_raw"]) / pre.name / "labelsTr"
    cases = sorted(p.name[: -len(".nii.gz")] for p in labels_tr.iterdir())
    # fold 0: everything but N_VAL cases (one of each generator) trains; test phantoms are separate
    val = [c for c in cases if c.endswith("000") or c.endswith("001")][:N_VAL]
    (pre / "splits_final.json").write_text(json.dumps([{"train": [c for c in cases if c not in val], "val": val}]))
    dj = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False
    cls = make_trainer_class(epochs)
    torch.manual_seed(did)
    # one intra-op thread: on a shared 2-core machine a second thread waiting at every parallel
    # region's barrier made epochs 3x slower; set MRA_TRAIN_THREADS on a dedicated machine
    torch.set_num_threads(int(os.environ.get("MRA_TRAIN_THREADS", "1")))
    trainer = cls(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    if init_from is not None:  # continue from an exported model (same plans): every weight, seg layers too
        trainer.initialize()
        ck = torch.load(init_from / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        trainer.network.load_state_dict(ck["network_weights"])
    t0 = time.time()
    trainer.run_training()
    print(f"Dataset{did:03d}: trained {epochs} epochs in {time.time() - t0:.0f} s", flush=True)
    return Path(trainer.output_folder), pre


def export(did: int, trained_fold: Path, pre: Path, out: Path, epochs: int, history: str | None = None,
           negatives: int = 0) -> Path:
    import torch

    name = DATASETS[did][0]
    dest = out / f"Dataset{did:03d}_{name}" / FOLDER
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "fold_0").mkdir(parents=True)
    ck = torch.load(trained_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    slim = {
        "network_weights": ck["network_weights"],
        "trainer_name": TRAINER,
        "init_args": {"configuration": "3d_fullres", "fold": 0},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": ck["current_epoch"],
        "mrannotator_demo": {
            "trained_with": (f"{history}; then " if history else "")
            + f"{TRAINER} (schedule: {epochs} epochs x 25 iterations, batch 2, AdamW 3e-3, CPU"
            + (f"; {negatives} negative phantoms of every other region" if negatives else "") + ")",
            "pseudo_dice_last_epoch": [float(x) for x in ck["logging"]["dice_per_class_or_region"][-1]],
        },
    }
    torch.save(slim, dest / "fold_0" / "checkpoint_final.pth")
    for f in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(pre / f, dest / f)
    shutil.copy(pre / "nnUNetPlans.json", dest / "plans.json")
    return dest


def measure(did: int, model_dir: Path) -> dict:
    """Per-class Dice of the exported model on held-out phantoms (never trained on)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from mrannotator.phantoms import make_phantom, to_model_labels

    name, labels, gens, _ = DATASETS[did]
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    dj = json.loads((model_dir / "dataset.json").read_text())
    per_class: dict[str, list[float]] = {n: [] for n in labels}
    cases = []
    for gen, _, n_test in gens:
        for k in range(n_test):
            seed = TEST_SEED_OFFSET + k
            ph = make_phantom(gen, seed=seed, orientation="LAS")
            img = np.asarray(ph.image.dataobj).astype(np.float32)
            # nnU-Net's SimpleITK reader order: (z, y, x) with spacing reversed
            seg = pred.predict_single_npy_array(
                img.transpose(2, 1, 0)[None], {"spacing": list(ph.image.header.get_zooms()[::-1])}
            ).transpose(2, 1, 0)
            truth = to_model_labels(np.asarray(ph.labels.dataobj), dj["labels"])
            case = {"case": f"{gen}-seed{seed}", "dice": {}}
            for i, n in enumerate(labels, start=1):
                t, p = truth == i, seg == i
                if t.sum() == 0 and p.sum() == 0:
                    continue  # structure not in this phantom and not predicted
                d = 2.0 * (t & p).sum() / (t.sum() + p.sum())
                per_class[n].append(float(d))
                case["dice"][n] = round(float(d), 4)
            cases.append(case)
    summary = {n: round(float(np.mean(v)), 4) for n, v in per_class.items() if v}
    return {
        "dataset": f"Dataset{did:03d}_{name}",
        "n_heldout_cases": len(cases),
        "heldout_seeds_from": TEST_SEED_OFFSET,
        "mean_dice": round(float(np.mean(list(summary.values()))), 4),
        "per_class_mean_dice": summary,
        "cases": cases,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "demo")
    ap.add_argument("--work", type=Path, default=None, help="nnU-Net raw/preprocessed/results (default: temp)")
    ap.add_argument("--datasets", type=int, nargs="+", default=sorted(DATASETS))
    ap.add_argument("--epochs", type=int, default=None, help="override every dataset's epoch count")
    ap.add_argument("--measure-only", action="store_true", help="re-measure exported models, no training")
    ap.add_argument("--continue", dest="cont", action="store_true",
                    help="start from the model already exported in --out (more epochs on the same plans)")
    ap.add_argument("--negatives", type=int, default=0,
                    help="add this many phantoms of every other region as all-background training cases")
    args = ap.parse_args(argv)
    if args.negatives < 0:
        ap.error(f"--negatives {args.negatives}: expected 0 or more phantoms per other region")
    work = args.work or Path(tempfile.mkdtemp(prefix="mra-demo-"))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / k).mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(work / k)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    if "nnunetv2" in sys.modules:
        raise RuntimeError("nnunetv2 was imported before its paths were set")
    args.out.mkdir(parents=True, exist_ok=True)
    for did in args.datasets:
        name, _, _, epochs = DATASETS[did]
        epochs = args.epochs or epochs
        dest = args.out / f"Dataset{did:03d}_{name}" / FOLDER
        if not args.measure_only:
            write_raw(work / "nnUNet_raw", did, args.negatives)
            init = dest if args.cont else None
            if init is not None:  # keep the previous model until the new one is trained
                keep = Path(tempfile.mkdtemp(prefix="mra-prev-")) / dest.name
                shutil.copytree(dest, keep)
                init = keep
            history = None
            if init is not None:
                import torch

                prev = torch.load(init / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
                history = prev.get("mrannotator_demo", {}).get("trained_with")
            trained, pre = train(did, epochs, init)
            dest = export(did, trained, pre, args.out, epochs, history, args.negatives)
        result = measure(did, dest)
        (dest.parent / "heldout_dice.json").write_text(json.dumps(result, indent=2))
        print(f"Dataset{did:03d}_{name}: held-out mean Dice {result['mean_dice']:.3f} "
              f"on {result['n_heldout_cases']} phantoms: {result['per_class_mean_dice']}", flush=True)
    write_summary(args.out)
    return 0


def write_summary(out: Path) -> None:
    rows = []
    for f in sorted(out.glob("Dataset*/heldout_dice.json")):
        r = json.loads(f.read_text())
        rows.append(f"| {r['dataset']} | {len(r['per_class_mean_dice'])} | {r['n_heldout_cases']} | "
                    f"{r['mean_dice']:.3f} | {min(r['per_class_mean_dice'].values()):.3f} |")
    text = (
        "# MRAnnotator demo weights\n\n"
        "Real nnU-Net v2 models (3d_fullres, fold 0, nnUNetTrainerNoMirroring layout) trained by\n"
        "`python models/make_demo_weights.py` on synthetic MR phantoms (`mrannotator.phantoms`).\n"
        "They exist so that everything runs offline; they are NOT the MRAnnotator paper's weights and\n"
        "know nothing about real anatomy. Install the official release with `mrannotator weights install`.\n\n"
        "Held-out Dice (phantoms with seeds never used in training; per-class values in each\n"
        "`heldout_dice.json`):\n\n"
        "| model | classes | held-out phantoms | mean Dice | worst class |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
