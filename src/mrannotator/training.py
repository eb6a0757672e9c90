"""One fine-tuning run over a model store: what the MONAI Label trainer and ``mrannotator finetune`` both do.

Each region model whose structures appear in at least one label is fine-tuned from the checkpoint served
now (:func:`mrannotator.finetune.finetune`). All models of the run are staged first and published together
as one new version of the :class:`~mrannotator.modelstore.ModelStore`, only after every one of them trained:
a run that fails or is killed at any point leaves the previous version serving. Preprocessed cases and every
temporary file go to a work folder under the store (never /tmp), removed at the end of the run, or by
``ModelStore.clean`` at the next start if the run was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .finetune import Case, FinetuneError, finetune
from .imageio import load_image, save_json
from .modelstore import BASE_FILE, ModelStore
from .weights import Weights

# fine-tuning schedule, chosen by measurement on the annotation study's new site (README "Annotation study"):
# 8 x 25 iterations from the served checkpoint at nnU-Net's initial learning rate, poly decay
DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_VAL_ITERATIONS, DEFAULT_LR = 8, 25, 1, 1e-2


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = DEFAULT_EPOCHS
    iterations: int = DEFAULT_ITERATIONS
    val_iterations: int = DEFAULT_VAL_ITERATIONS
    learning_rate: float = DEFAULT_LR
    device: str = "cpu"

    def checked(self) -> TrainSettings:
        for key in ("epochs", "iterations", "val_iterations", "learning_rate"):
            if not getattr(self, key) > 0:
                raise FinetuneError(f"train parameter {key}={getattr(self, key)!r}: must be positive")
        return self


class NoFaults:
    """Where the server's fault hook (lib/trainers/faults.py) would kill a run: nothing happens."""

    passed: list[str] = []

    def point(self, name: str) -> None:
        pass


@contextlib.contextmanager
def temp_files_in(folder: Path):
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


def plan_run(models, cases: Sequence[Case]) -> list[tuple[object, list[Case]]]:
    """(region model, its cases) for every model with a structure in at least one label."""
    if not cases:
        raise FinetuneError("no image has a final label yet: submit labels first")
    present = [set(np.unique(np.asanyarray(load_image(c.labels).dataobj)).tolist()) for c in cases]
    plan = []
    for model in models:
        ids = {s.id for s in model.structures.values()}
        mine = [c for c, found in zip(cases, present, strict=True) if ids & found]
        if mine:
            plan.append((model, mine))
    if not plan:
        raise FinetuneError("the labels contain no structure of any served model")
    return plan


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FinetuneRun:
    """One run: ``FinetuneRun(store, pretrained, settings)(cases, models)`` -> stats (status DONE and the
    new version). ``write_stats`` gets the stats after every epoch; ``faults.point(name)`` is called at
    each step (the server's kill tests); ``log`` gets one line per step."""

    def __init__(self, store: ModelStore, pretrained: Weights, settings: TrainSettings, *,
                 write_stats: Callable[[dict], None] | None = None, faults=None,
                 log: Callable[[str], None] | None = None):
        self.store, self.pretrained, self.settings = store, pretrained, settings.checked()
        self.write_stats = write_stats or (lambda stats: None)
        self.faults = faults or NoFaults()
        self.log = log or (lambda line: None)

    def __call__(self, cases: Sequence[Case], models, previous_version: str) -> dict:
        plan = plan_run(models, cases)
        work, staging = self.store.new_run()
        s = self.settings
        stats = {"status": "RUNNING", "pid": os.getpid(), "started": _now(), "epochs_planned": s.epochs,
                 "iterations": s.iterations, "learning_rate": s.learning_rate, "previous_version": previous_version,
                 "fault_points": self.faults.passed,
                 "models": {m.dataset: {"cases": [c.name for c in mc], "epochs": []} for m, mc in plan}}
        self.write_stats(stats)
        t0 = time.time()
        try:
            with temp_files_in(work / "tmp"):
                self.faults.point("start")
                for model, model_cases in plan:
                    self._train_one(model, model_cases, stats, work, staging)
                self._carry_over(staging, {m.dataset for m, _ in plan})
                self.faults.point("staged")
                version = self.store.publish(staging, before_switch=lambda: self.faults.point("renamed"))
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            stats.update(status="FAILED", error=f"{type(e).__name__}: {e}"[:2000], finished=_now())
            self.write_stats(stats)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for dataset, entry in stats["models"].items():
            entry["checkpoint"] = str(self.store.published_folder(self._pretrained(dataset), self.store.versions
                                                                  / version) / "fold_0" / "checkpoint_final.pth")
        self.log(f"published model version {version}: {', '.join(stats['models'])}")
        stats.update(status="DONE", seconds=round(time.time() - t0, 1), version=version, finished=_now(),
                     settings=asdict(s))
        self.write_stats(stats)
        return stats

    def _pretrained(self, dataset: str):
        return next(m for m in self.pretrained.models if m.dataset == dataset)

    def _train_one(self, model, cases: list[Case], stats: dict, work: Path, staging: Path) -> None:
        s, entry, dataset = self.settings, stats["models"][model.dataset], model.dataset

        def on_epoch(row):
            entry["epochs"].append(row)
            stats["epoch"], stats["val_mean_dice"] = row["epoch"], row["val_mean_dice"]
            self.write_stats(stats)
            self.log(f"{dataset} epoch {row['epoch']}/{s.epochs}: train loss {row['train_loss']}, "
                     f"val loss {row['val_loss']}, val Dice {row['val_mean_dice']}")
            self.faults.point(f"{dataset}:epoch{row['epoch']}")

        self.faults.point(f"{dataset}:begin")
        self.log(f"{dataset}: fine-tuning on {len(cases)} case(s) from {model.folder.checkpoint}")
        pretrained = self._pretrained(dataset)
        dest = self.store.published_folder(pretrained, staging)
        save_json(self.store.base_record(pretrained), dest / BASE_FILE)
        to_model = {st.id: v for v, st in model.structures.items()}
        result = finetune(model.folder, cases, dest, catalogue_to_model=to_model,
                          epochs=s.epochs, iterations=s.iterations, val_iterations=s.val_iterations,
                          learning_rate=s.learning_rate, device=s.device, on_epoch=on_epoch, work=work / dataset)
        shutil.rmtree(work / dataset, ignore_errors=True)  # its preprocessed cases
        entry["seconds"] = round(result.seconds, 1)
        self.log(f"{dataset}: staged {result.checkpoint}")
        self.faults.point(f"{dataset}:staged")

    def _carry_over(self, staging: Path, trained: set[str]) -> None:
        """Fine-tuned models this run did not touch stay in the new version as they were served."""
        served, _ = self.store.served_models(self.pretrained)
        for m in served:
            if m.finetuned and m.folder.dataset not in trained:
                shutil.copytree(m.folder.path, self.store.published_folder(self._pretrained(m.folder.dataset), staging))
