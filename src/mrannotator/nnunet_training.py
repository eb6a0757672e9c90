"""The fine-tuning side of the nnU-Net adapter: nnU-Net's folders, preprocessing of training cases, a
short-schedule trainer and the checkpoint schema. Its internals are listed with the prediction side's in
:data:`mrannotator.nnunet_adapter.INTERNALS` and checked there (``require_compatible``)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .nnunet_adapter import (
    CONFIGURATION,
    NO_MIRRORING_TRAINER,
    require_compatible,
)


@contextlib.contextmanager
def nnunet_folders(work: Path) -> Iterator[None]:
    """nnU-Net's raw / preprocessed / results folders under ``work`` within the block.

    nnU-Net reads them from the environment at use time (``nnunetv2.paths``); the old values come back on exit.
    """
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        (work / k).mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(work / k)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def preprocess_training_cases(plans: dict, dataset_json: dict, raw: Path, out_root: Path, names: list[str]) -> None:
    """nnU-Net's ``DefaultPreprocessor`` on raw cases ``imagesTr/<name>_0000.nii.gz`` + ``labelsTr/<name>.nii.gz``."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    out = out_root / cm.data_identifier
    out.mkdir(exist_ok=True)
    preprocessor = DefaultPreprocessor(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):
        for name in names:  # in-process: nnU-Net's worker pool is not needed for a handful of cases
            preprocessor.run_case_save(str(out / name), [str(raw / "imagesTr" / f"{name}_0000.nii.gz")],
                                       str(raw / "labelsTr" / f"{name}.nii.gz"), pm, cm, dataset_json)


def short_schedule_trainer(epochs: int, iterations: int, val_iterations: int, learning_rate: float,
                           on_epoch: Callable[[dict], None] | None = None):
    """nnUNetTrainerNoMirroring with a short schedule and a per-epoch report (same network, loss, augmentation)."""
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    require_compatible()

    class nnUNetTrainerNoMirroringFinetune(nnUNetTrainerNoMirroring):  # noqa: N801 (nnU-Net naming)
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            import torch

            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.initial_lr = learning_rate
            self.disable_checkpointing = True  # we export the weights ourselves, once, at the end

        def on_epoch_end(self):
            row = epoch_report(self)
            super().on_epoch_end()
            if on_epoch:
                on_epoch(row)

    return nnUNetTrainerNoMirroringFinetune


def epoch_report(trainer) -> dict:
    """The epoch that just ended, from nnU-Net's logger: losses and validation (pseudo) Dice per class."""
    log = trainer.logger
    dice = [float(x) for x in log.get_value("dice_per_class_or_region", step=-1)]
    return {
        "epoch": int(trainer.current_epoch) + 1,
        "train_loss": round(float(log.get_value("train_losses", step=-1)), 4),
        "val_loss": round(float(log.get_value("val_losses", step=-1)), 4),
        "val_dice_per_class": [round(d, 4) if np.isfinite(d) else None for d in dice],
        "val_mean_dice": round(float(np.nanmean(dice)), 4) if np.isfinite(dice).any() else None,
    }


def trainer_plans(plans: dict) -> dict:
    """The plans as a trainer takes them: nnU-Net 2.8 pops a ``continue_training`` flag from them."""
    return {**plans, "continue_training": False}


def bare_network(network):
    """The network itself, also when nnU-Net wrapped it with ``torch.compile`` (``_orig_mod``)."""
    return getattr(network, "_orig_mod", network)


def load_every_weight(trainer, checkpoint: Path) -> None:
    """Every weight of a checkpoint into the trainer's network, segmentation heads included.

    (nnU-Net's own ``load_pretrained_weights`` skips the heads: fine-tuning continues the very model.)
    """
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    bare_network(trainer.network).load_state_dict(ckpt["network_weights"])


def network_weights(trainer) -> dict:
    """The trainer's network weights, on the CPU."""
    return {k: v.detach().cpu() for k, v in bare_network(trainer.network).state_dict().items()}


def slim_checkpoint(network_weights: dict, fold: int, epochs: int, provenance: dict) -> dict:
    """A checkpoint with what ``nnUNetPredictor`` reads (and our provenance), naming ``nnUNetTrainerNoMirroring``.

    Same network and inference as the fine-tuning trainer, so the predictor needs no custom trainer class.
    """
    return {
        "network_weights": network_weights,
        "trainer_name": NO_MIRRORING_TRAINER,
        "init_args": {"configuration": CONFIGURATION, "fold": fold},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": epochs,
        "mrannotator_finetune": provenance,
    }
