"""Fine-tune one nnU-Net region model on corrected labels, with nnU-Net's own pipeline, on the CPU.

    from mrannotator.finetune import Case, finetune
    result = finetune(model_folder, [Case("a", image, labels), ...], dest, epochs=3, iterations=10)
    result.checkpoint          # a slim checkpoint, published into ``dest`` only once training finished
    result.epochs              # per-epoch train/validation loss and validation (pseudo) Dice per class

What it does, in nnU-Net's terms (the same steps as ``models/make_demo_weights.py``, minus planning):

1. every case is brought losslessly to the model's orientation (as the engine does before predicting),
   its catalogue-id labels are mapped to the model's dataset.json values, and both are written as an
   nnU-Net raw dataset;
2. nnU-Net's ``DefaultPreprocessor`` preprocesses them with the model's own ``plans.json`` (same
   resampling, normalisation and intensity statistics as the pretrained model saw), in this process;
3. a subclass of ``nnUNetTrainerNoMirroring`` that only shortens the schedule starts from the current
   checkpoint's weights and trains ``epochs`` x ``iterations`` steps (fold ``all``: the submitted cases
   are also the validation cases, so the per-epoch Dice is a pseudo Dice on them);
4. the network weights are exported as a slim checkpoint (weights, trainer name, init args, no
   mirroring) that ``nnUNetPredictor`` loads, and copied with dataset.json/plans.json into ``dest``
   atomically. A run that fails or is killed publishes nothing, so the previous checkpoint stays.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from . import nnunet_training as nnunet_train
from .errors import MRAnnotatorError
from .imageio import load_image, save_json, write_atomic
from .labels import accept_label
from .nnunet_adapter import CONFIGURATION
from .orientation import reorient_to
from .weights import CHECKPOINT, FOLD, ModelFolder, read_model_folder


class FinetuneError(MRAnnotatorError):
    """Fine-tuning could not run (no usable cases, labels that do not fit, nnU-Net failed)."""

    exit_code = 4


@dataclass
class Case:
    """One training case: an image and its label volume of catalogue ids on the same grid."""

    name: str
    image: object  # path, nibabel or SimpleITK image (anything load_image reads)
    labels: object  # same, uint8 catalogue ids


@dataclass
class FinetuneResult:
    model: str  # dataset name
    checkpoint: Path  # the published checkpoint
    folder: Path  # the published trained-model folder
    epochs: list[dict] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "checkpoint": str(self.checkpoint),
            "folder": str(self.folder),
            "epochs": self.epochs,
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
        }


def model_label_lut(catalogue_to_model: dict[int, int]) -> np.ndarray:
    """Lookup table catalogue id -> model label value; structures the model lacks become background."""
    lut = np.zeros(256, np.uint8)
    for cid, value in catalogue_to_model.items():
        lut[int(cid)] = int(value)
    return lut


def prepare_dataset(model: ModelFolder, cases: Sequence[Case], catalogue_to_model: dict[int, int],
                    work: Path) -> tuple[Path, list[str]]:
    """Raw dataset (model orientation, model label values) and nnU-Net preprocessing with the model's plans.

    Returns the preprocessed dataset folder and the case identifiers. Must run inside
    ``nnunet_training.nnunet_folders``.
    """
    plans = json.loads((model.path / "plans.json").read_text())
    dataset_json = json.loads((model.path / "dataset.json").read_text())
    dataset_name = plans["dataset_name"]
    raw = Path(os.environ["nnUNet_raw"]) / dataset_name
    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    for d in (raw / "imagesTr", raw / "labelsTr", pre):
        d.mkdir(parents=True, exist_ok=True)
    lut = model_label_lut(catalogue_to_model)
    names = []
    for case in cases:
        img = load_image(case.image)
        what = f"the label volume of case {case.name}"
        lab = accept_label(load_image(case.labels), img.shape[:3], img.affine, what=what)
        data = np.asanyarray(lab.dataobj)
        axcodes = tuple(model.orientation)
        arr, aff, _ = reorient_to(np.asanyarray(img.dataobj), img.affine, axcodes)
        seg, _, _ = reorient_to(lut[data.astype(np.uint8)], lab.affine, axcodes)
        name = f"case{len(names):03d}"
        nib.save(nib.Nifti1Image(arr, aff), raw / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), aff), raw / "labelsTr" / f"{name}.nii.gz")
        names.append(name)
    if not names:
        raise FinetuneError(f"{model.dataset}: no case to fine-tune on")
    dataset_json = {**dataset_json, "numTraining": len(names)}
    save_json(dataset_json, raw / "dataset.json")
    save_json(dataset_json, pre / "dataset.json")
    save_json(plans, pre / "nnUNetPlans.json")
    fingerprint = model.path / "dataset_fingerprint.json"
    if fingerprint.is_file():
        shutil.copy(fingerprint, pre / "dataset_fingerprint.json")
    else:  # the trainer copies it next to its output; preprocessing itself reads the plans only
        save_json({}, pre / "dataset_fingerprint.json")

    nnunet_train.preprocess_training_cases(plans, dataset_json, raw, pre, names)
    return pre, names


def _seed(seed: int | None) -> None:
    import torch

    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(
    model: ModelFolder,
    cases: Sequence[Case],
    dest: Path,
    catalogue_to_model: dict[int, int],
    epochs: int = 3,
    iterations: int = 10,
    val_iterations: int = 2,
    learning_rate: float = 1e-2,
    device: str = "cpu",
    seed: int | None = 0,
    work: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` from its current checkpoint on ``cases`` and publish the result into ``dest``.

    ``dest`` becomes a trained-model folder (``DatasetXXX_Name/TRAINER__PLANS__3d_fullres``, like the
    release); its checkpoint is replaced atomically only after training ended normally.
    """
    if epochs < 1 or iterations < 1 or val_iterations < 1:
        raise FinetuneError("epochs, iterations and validation iterations must be at least 1")
    if not cases:
        raise FinetuneError(f"{model.dataset}: no case to fine-tune on")
    t0 = time.perf_counter()
    # single-process data loading (nnU-Net reads this at use time); no worker pool in a server subprocess
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="mra-finetune-")) if own_work else Path(work)
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        if on_epoch:
            on_epoch(row)

    try:
        with nnunet_train.nnunet_folders(work):
            pre, names = prepare_dataset(model, cases, catalogue_to_model, work)
            cls = nnunet_train.short_schedule_trainer(epochs, iterations, val_iterations, learning_rate, report)
            _seed(seed)
            weights, dev = _train(cls, model, pre, device)
        checkpoint = export_checkpoint(model, weights, dest, {
            "trained_with": f"{cls.__name__} (fine-tune: {epochs} epochs x {iterations} iterations, "
                            f"lr {learning_rate}, {dev.type})",
            "started_from": str(model.checkpoint),
            "cases": len(names),
            "epochs": rows,
        })
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(model=model.dataset, checkpoint=checkpoint, folder=checkpoint.parent.parent,
                          epochs=rows, cases=[c.name for c in cases], seconds=time.perf_counter() - t0)


def _train(trainer_class, model: ModelFolder, pre: Path, device: str) -> tuple[dict, object]:
    """nnU-Net training on the preprocessed dataset ``pre``, from every weight of the model's checkpoint.

    Returns (the trained network weights on the CPU, the torch device it ran on).
    """
    import torch

    plans = nnunet_train.trainer_plans(json.loads((pre / "nnUNetPlans.json").read_text()))
    dataset_json = json.loads((pre / "dataset.json").read_text())
    dev = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()) as log:
        trainer = trainer_class(plans, CONFIGURATION, "all", dataset_json, dev)
        trainer.initialize()
        nnunet_train.load_every_weight(trainer, model.checkpoint)
        try:
            trainer.run_training()
        except Exception as e:
            raise FinetuneError(f"{model.dataset}: nnU-Net training failed: {type(e).__name__}: {e}\n"
                                f"{log.getvalue()[-2000:]}") from e
    return nnunet_train.network_weights(trainer), dev


def export_checkpoint(model: ModelFolder, network_weights: dict, dest: Path, provenance: dict) -> Path:
    """Write a slim checkpoint and the model's dataset.json/plans.json into ``dest``; the checkpoint last.

    The checkpoint names ``nnUNetTrainerNoMirroring`` (identical network and inference), so the
    predictor needs no custom trainer class to load it (``nnunet_training.slim_checkpoint``). Returns the
    published checkpoint path.
    """
    import torch

    dest = Path(dest)
    fold = dest / f"fold_{FOLD}"
    fold.mkdir(parents=True, exist_ok=True)
    for f in ("dataset.json", "plans.json"):
        if not (dest / f).is_file():
            shutil.copy2(model.path / f, dest / f)
    slim = nnunet_train.slim_checkpoint(network_weights, FOLD, len(provenance.get("epochs", [])), provenance)
    # atomic: a reader sees the old or the new checkpoint, never half of one
    target = write_atomic(fold / CHECKPOINT, lambda tmp: torch.save(slim, tmp))
    read_model_folder(dest)  # the published folder must load like a release
    return target
