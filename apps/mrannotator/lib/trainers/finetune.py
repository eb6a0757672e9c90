"""Train task: fine-tune the served nnU-Net region models on the datastore's final labels.

Runs in the subprocess MONAI Label starts for ``POST /train/``; a thin TrainTask over
:class:`mrannotator.training.FinetuneRun` (the same run ``mrannotator finetune`` does without a server): the
request's parameters and the datastore's final labels in, one new published model version out. Progress
(per-epoch loss and validation Dice) goes to ``model_dir/train_stats.json`` (shown in ``/info`` train_stats)
and to the log lines shown by ``GET /train/``. ``MRANNOTATOR_TRAIN_KILL_AT`` makes a run SIGKILL itself
(lib/trainers/faults.py).
"""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.service import ModelService
from lib.trainers.faults import FaultPoints
from mrannotator.finetune import Case, FinetuneError
from mrannotator.imageio import save_json
from mrannotator.training import FinetuneRun, TrainSettings

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"


def _alive(pid) -> bool:
    """Whether the training process still runs (a killed one stays a zombie until MONAI Label reaps it)."""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (TypeError, ValueError, psutil.NoSuchProcess):
        return False


def _number(request: dict, key: str, default, cast):
    raw = request.get(key, default)
    try:
        value = cast(raw)
    except (TypeError, ValueError):
        raise FinetuneError(f"train parameter {key}={raw!r}: expected a number") from None
    if not value > 0:
        raise FinetuneError(f"train parameter {key}={raw!r}: must be positive")
    return value


def train_settings(request: dict, defaults) -> TrainSettings:
    """The run's settings: the request's parameters over the app's ``--conf`` defaults."""
    device = str(request.get("device") or defaults.device)
    return TrainSettings(epochs=int(_number(request, "max_epochs", defaults.epochs, int)),
                         iterations=int(_number(request, "iterations", defaults.iterations, int)),
                         val_iterations=int(_number(request, "val_iterations", defaults.val_iterations, int)),
                         learning_rate=float(_number(request, "learning_rate", defaults.learning_rate, float)),
                         device="cpu" if device in ("auto", "") else device)


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

    def __call__(self, request, datastore: Datastore):
        settings = train_settings(request, self.service.settings)
        cases = [Case(str(p["image"]).rsplit("/", 1)[-1], p["image"], p["label"]) for p in datastore.datalist()]
        if not cases:
            raise FinetuneError("no image has a final label yet: submit labels (PUT /datastore/label) first")
        run = FinetuneRun(self.service.store, self.service.pretrained, settings,
                          write_stats=lambda stats: save_json(stats, self.stats_path), faults=FaultPoints(),
                          log=logger.info)
        return run(cases, self.service.segmenter().models, self.service.model_version())
