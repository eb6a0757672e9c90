"""Train task: fine-tune the served nnU-Net region models on the datastore's final labels.

Runs in the subprocess MONAI Label starts for ``POST /train/``. Each region model whose structures
appear in at least one final label is fine-tuned from the checkpoint it serves now
(``mrannotator.finetune``). All models of the run are staged first and published together as one
new version (``lib.service.ModelStore``), only after every one of them trained: a run that fails or
is killed at any point leaves the previous version serving. Preprocessed cases and every temporary
file go to a work folder under ``model_dir/.work`` (never /tmp), removed at the end of the run, or
at the next start of the app if the run was killed. Progress (per-epoch loss and validation Dice)
goes to ``model_dir/train_stats.json`` (shown in ``/info`` train_stats) and to the log lines shown
by ``GET /train/``. ``MRANNOTATOR_TRAIN_KILL_AT`` makes a run SIGKILL itself (lib/trainers/faults.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.service import BASE_FILE, ModelService
from lib.trainers.faults import FaultPoints
from mrannotator.finetune import Case, FinetuneError, finetune
from mrannotator.imageio import load_image, save_json

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"


def _alive(pid) -> bool:
    """Whether the training process still runs (a killed one stays a zombie until MONAI Label reaps it)."""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (TypeError, ValueError, psutil.NoSuchProcess):
        return False


@contextlib.contextmanager
def _temp_files_in(folder):
    """Every temporary file of this process (Python's tempfile, and children through TMPDIR) goes to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


def _number(request: dict, key: str, default, cast):
    raw = request.get(key, default)
    try:
        value = cast(raw)
    except (TypeError, ValueError):
        raise FinetuneError(f"train parameter {key}={raw!r}: expected a number") from None
    if not value > 0:
        raise FinetuneError(f"train parameter {key}={raw!r}: must be positive")
    return value


class NnUNetFineTune(TrainTask):
    def __init__(self, service: ModelService):
        super().__init__("Fine-tunes the served nnU-Net region models (nnUNetTrainerNoMirroring, the model's "
                         "own plans and preprocessing) from their current checkpoints on the final labels")
        self.service = service
        self.stats_path = service.settings.model_dir / STATS_FILE

    def config(self):
        s = self.service.settings
        return {"max_epochs": s.epochs, "iterations": s.iterations, "val_iterations": s.val_iterations,
                "learning_rate": s.learning_rate, "device": s.device}

    def stats(self):
        import json

        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not _alive(stats.get("pid")):
            stats["status"] = "STOPPED"  # killed (DELETE /train/) or crashed: nothing was published
        return stats

    def _write(self, stats: dict) -> None:
        save_json(stats, self.stats_path)

    def __call__(self, request, datastore: Datastore):
        s = self.service.settings
        epochs = int(_number(request, "max_epochs", s.epochs, int))
        iterations = int(_number(request, "iterations", s.iterations, int))
        val_iterations = int(_number(request, "val_iterations", s.val_iterations, int))
        lr = float(_number(request, "learning_rate", s.learning_rate, float))
        device = str(request.get("device") or s.device)
        device = "cpu" if device in ("auto", "") else device

        pairs = datastore.datalist()
        if not pairs:
            raise FinetuneError("no image has a final label yet: submit labels (PUT /datastore/label) first")
        labels = {p["label"]: np.asanyarray(load_image(p["label"]).dataobj) for p in pairs}
        segmenter = self.service.segmenter()
        plan = []
        for model in segmenter.models:
            ids = {s.id for s in model.structures.values()}
            cases = [Case(str(p["image"]).rsplit("/", 1)[-1], p["image"], p["label"]) for p in pairs
                     if ids & set(np.unique(labels[p["label"]]).tolist())]
            if cases:
                plan.append((model, cases))
        if not plan:
            raise FinetuneError("the final labels contain no structure of any served model")

        store = self.service.store
        faults = FaultPoints()
        work, staging = store.new_run()
        stats = {"status": "RUNNING", "pid": os.getpid(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
                 "epochs_planned": epochs, "iterations": iterations, "learning_rate": lr,
                 "previous_version": self.service.model_version(), "fault_points": faults.passed,
                 "models": {m.dataset: {"cases": [c.name for c in cases], "epochs": []} for m, cases in plan}}
        self._write(stats)
        t0 = time.time()
        try:
            with _temp_files_in(work / "tmp"):
                faults.point("start")
                for model, cases in plan:
                    entry = stats["models"][model.dataset]

                    def on_epoch(row, entry=entry, dataset=model.dataset):
                        entry["epochs"].append(row)
                        stats["epoch"] = row["epoch"]
                        stats["val_mean_dice"] = row["val_mean_dice"]
                        self._write(stats)
                        logger.info(f"{dataset} epoch {row['epoch']}/{epochs}: train loss {row['train_loss']}, "
                                    f"val loss {row['val_loss']}, val Dice {row['val_mean_dice']}")
                        faults.point(f"{dataset}:epoch{row['epoch']}")

                    faults.point(f"{model.dataset}:begin")
                    logger.info(f"{model.dataset}: fine-tuning on {len(cases)} case(s) from {model.folder.checkpoint}")
                    pretrained = next(m for m in self.service.pretrained.models if m.dataset == model.dataset)
                    dest = self.service.published_folder(pretrained, staging)
                    save_json(self.service.base_record(pretrained), dest / BASE_FILE)
                    result = finetune(
                        model.folder, cases, dest,
                        catalogue_to_model={s.id: v for v, s in model.structures.items()},
                        epochs=epochs, iterations=iterations, val_iterations=val_iterations,
                        learning_rate=lr, device=device, on_epoch=on_epoch, work=work / model.dataset,
                    )
                    shutil.rmtree(work / model.dataset, ignore_errors=True)  # its preprocessed cases
                    entry["seconds"] = round(result.seconds, 1)
                    logger.info(f"{model.dataset}: staged {result.checkpoint}")
                    faults.point(f"{model.dataset}:staged")
                self._carry_over(staging, {m.dataset for m, _ in plan})
                faults.point("staged")
                version = store.publish(staging, before_switch=lambda: faults.point("renamed"))
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            stats.update(status="FAILED", error=f"{type(e).__name__}: {e}"[:2000],
                         finished=datetime.now(UTC).isoformat(timespec="seconds"))
            self._write(stats)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for dataset, entry in stats["models"].items():
            entry["checkpoint"] = str(self.service.published_folder(
                next(m for m in self.service.pretrained.models if m.dataset == dataset),
                store.versions / version) / "fold_0" / "checkpoint_final.pth")
        logger.info(f"published model version {version}: {', '.join(stats['models'])}")
        stats.update(status="DONE", seconds=round(time.time() - t0, 1), version=version,
                     finished=datetime.now(UTC).isoformat(timespec="seconds"))
        self._write(stats)
        return stats

    def _carry_over(self, staging, trained: set[str]) -> None:
        """Fine-tuned models this run did not touch stay in the new version as they were served."""
        for m in self.service.served():
            if m.finetuned and m.folder.dataset not in trained:
                pretrained = next(p for p in self.service.pretrained.models if p.dataset == m.folder.dataset)
                shutil.copytree(m.folder.path, self.service.published_folder(pretrained, staging))
