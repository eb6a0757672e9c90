"""The engine as this app serves it: settings from ``--conf``, one Segmenter per process, hot reload.

Fine-tuned checkpoints are published as whole versions (:class:`ModelStore`)::

    model_dir/versions/<version>/DatasetXXX_Name/TRAINER__PLANS__3d_fullres/fold_0/checkpoint_final.pth
    model_dir/current -> versions/<version>        (one symlink, switched by one atomic rename)

A training run writes every region model it fine-tunes (and carries over the fine-tuned models it did
not touch) into a staging folder, renames it into ``versions/`` and only then switches ``current``: all
models of a run become visible together, and a run killed at any point leaves the previous version
serving. Before every prediction the service compares what ``current`` names with what it loaded and
reloads when it changed; ``/info`` and every infer result name the version actually loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrannotator import limits
from mrannotator.catalogue import region_names
from mrannotator.engine import Segmentation, Segmenter
from mrannotator.errors import InputError
from mrannotator.weights import ModelFolder, Weights, demo_weights_dir, installed_dir, load_weights, read_model_folder

logger = logging.getLogger(__name__)

BASE_FILE = "mrannotator_base.json"
PRETRAINED = "pretrained"  # the model version name while nothing fine-tuned is published

# fine-tuning schedule, chosen by measurement on the annotation study's new site (README "Annotation study"):
# 8 x 25 iterations from the served checkpoint at nnU-Net's initial learning rate, poly decay
DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_VAL_ITERATIONS, DEFAULT_LR = 8, 25, 1, 1e-2

CONF_OPTIONS = {
    "weights": "auto (installed official weights, else the demo weights), demo, official, or a folder",
    "regions": f"all, or a comma-separated list of regions/aliases ({', '.join(region_names())})",
    "device": "auto, cpu or cuda",
    "mode": "exact (default: labels as stock nnU-Net) or fast (bf16 on CPUs with native bf16, fp16 on CUDA)",
    "threads": "CPU threads for torch (default: torch's choice)",
    "model_dir": "where fine-tuned checkpoints are published (default: APP_DIR/model)",
    "epochs": f"fine-tuning epochs per run (default {DEFAULT_EPOCHS})",
    "iterations": f"training iterations per epoch (default {DEFAULT_ITERATIONS})",
    "val_iterations": f"validation iterations per epoch (default {DEFAULT_VAL_ITERATIONS})",
    "learning_rate": f"initial learning rate of the fine-tuning (default {DEFAULT_LR} as nnU-Net, poly decay)",
    "reserve_seconds": "how long an image handed out by a strategy is kept from other annotators (default 600)",
    "max_voxels": "largest image or label accepted, in voxels (default 268435456 = 2^28; MRANNOTATOR_MAX_VOXELS)",
    "max_bytes": "largest image or label accepted, in bytes of voxel data and of file size (default 1 GiB)",
    "infer_queue": "infer requests that may wait behind the running one; more get 503 with Retry-After (default 16)",
    "workers": "worker threads for datastore writes, strategies and scoring (default 4)",
}


def _int(conf: dict, key: str, default: int | None, minimum: int = 1) -> int | None:
    raw = conf.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise ValueError(f"--conf {key} {raw!r}: expected a whole number") from None
    if value < minimum:
        raise ValueError(f"--conf {key} {raw!r}: must be at least {minimum}")
    return value


def _mode(conf: dict) -> str:
    mode = str(conf.get("mode") or "exact").strip().lower()
    if mode not in ("exact", "fast"):
        raise ValueError(f"--conf mode {mode!r}: expected exact or fast")
    return mode


def _float(conf: dict, key: str, default: float) -> float:
    raw = conf.get(key)
    if raw in (None, ""):
        return default
    try:
        value = float(str(raw))
    except ValueError:
        raise ValueError(f"--conf {key} {raw!r}: expected a number") from None
    if not value > 0:
        raise ValueError(f"--conf {key} {raw!r}: must be positive")
    return value


@dataclass(frozen=True)
class AppSettings:
    """What ``--conf KEY VALUE`` may set (MONAI Label hands every value over as a string)."""

    weights: str = "auto"
    regions: tuple[str, ...] | None = None
    device: str = "auto"
    mode: str = "exact"
    threads: int | None = None
    model_dir: Path = Path("model")
    epochs: int = DEFAULT_EPOCHS
    iterations: int = DEFAULT_ITERATIONS
    val_iterations: int = DEFAULT_VAL_ITERATIONS
    learning_rate: float = DEFAULT_LR
    reserve_seconds: int = 600
    max_voxels: int = limits.DEFAULT_MAX_VOXELS
    max_bytes: int = limits.DEFAULT_MAX_BYTES
    infer_queue: int = 16
    workers: int = 4

    @classmethod
    def from_conf(cls, conf: dict | None, app_dir: str | Path) -> AppSettings:
        conf = dict(conf or {})
        regions = str(conf.get("regions") or "all").strip()
        return cls(
            weights=str(conf.get("weights") or "auto").strip(),
            regions=None if regions.lower() == "all" else tuple(r for r in regions.split(",") if r.strip()),
            device=str(conf.get("device") or "auto").strip().lower(),
            mode=_mode(conf),
            threads=_int(conf, "threads", None),
            model_dir=Path(conf.get("model_dir") or Path(app_dir) / "model").expanduser().resolve(),
            epochs=_int(conf, "epochs", DEFAULT_EPOCHS),
            iterations=_int(conf, "iterations", DEFAULT_ITERATIONS),
            val_iterations=_int(conf, "val_iterations", DEFAULT_VAL_ITERATIONS),
            learning_rate=_float(conf, "learning_rate", DEFAULT_LR),
            reserve_seconds=_int(conf, "reserve_seconds", 600, minimum=0),
            max_voxels=_int(conf, "max_voxels", limits.Limits.from_env().max_voxels),
            max_bytes=_int(conf, "max_bytes", limits.Limits.from_env().max_bytes),
            infer_queue=_int(conf, "infer_queue", 16, minimum=0),
            workers=_int(conf, "workers", 4),
        )

    def input_limits(self) -> limits.Limits:
        return limits.Limits(max_voxels=self.max_voxels, max_bytes=self.max_bytes)


def pretrained_weights(spec: str) -> Weights:
    """The weights named by ``--conf weights``: auto, demo, official or a folder."""
    spec = spec.strip()
    if spec in ("", "auto"):
        return load_weights(None)
    if spec == "demo":
        return load_weights(demo_weights_dir(), "demo")
    if spec == "official":
        if not (installed_dir() / "manifest.json").is_file():
            raise ValueError("--conf weights official: no official weights are installed "
                             "(run `mrannotator weights install RELEASE` first)")
        return load_weights(installed_dir(), "official")
    return load_weights(Path(spec).expanduser())


@dataclass
class ServedModel:
    folder: ModelFolder
    finetuned: bool
    model_version: str = PRETRAINED
    signature: tuple = field(default=())

    def describe(self) -> dict:
        ck = self.folder.checkpoint
        st = ck.stat()
        return {
            "dataset": self.folder.dataset,
            "checkpoint": str(ck),
            "finetuned": self.finetuned,
            "model_version": self.model_version,
            "modified": int(st.st_mtime),
            "size": st.st_size,
            "version": hashlib.sha1(f"{ck}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:12],
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelStore:
    """The published versions in ``model_dir`` and the one ``current`` names.

    Folders a run writes carry its pid (``.work/run-<pid>-<t>``, ``versions/.staging-<pid>-<t>``), so
    :meth:`clean` removes only what a dead run left (a killed training), never a running one's.
    """

    KEEP_VERSIONS = 3  # the current one and two before it (a server may be loading one just replaced)

    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.current_link = self.root / "current"
        self.work_root = self.root / ".work"

    def current(self) -> tuple[str, Path] | None:
        """(version name, folder) of the published version, None while only pretrained weights are served."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        folder = (self.root / target).resolve()
        return (folder.name, folder) if folder.is_dir() else None

    def new_run(self) -> tuple[Path, Path]:
        """A work folder (preprocessed cases, nnU-Net's folders, temp files) and a staging folder for one run."""
        tag = f"{os.getpid()}-{time.time_ns()}"
        work = self.work_root / f"run-{tag}"
        staging = self.versions / f".staging-{tag}"
        work.mkdir(parents=True)
        staging.mkdir(parents=True)
        return work, staging

    def publish(self, staging: Path, before_switch=None) -> str:
        """Rename the staged folder into ``versions/`` and switch ``current`` to it (each an atomic rename)."""
        name = time.strftime("v%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
        final = self.versions / name
        os.rename(staging, final)
        if before_switch:
            before_switch()
        link = self.root / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(os.path.join("versions", name), link)
        os.replace(link, self.current_link)
        return name

    def clean(self) -> list[Path]:
        """Remove what dead runs left (work and staging folders, unswitched versions) and old versions."""
        removed = []

        def left_by_dead_run(path: Path) -> bool:
            try:  # run-<pid>-<t>, .staging-<pid>-<t>, .current-<pid>, v<time>-<pid>
                return not _pid_alive(int(path.name.split("-")[1]))
            except (IndexError, ValueError):
                return True

        leftovers = [*self.work_root.glob("run-*"), *self.versions.glob(".staging-*"), *self.root.glob(".current-*")]
        for path in leftovers:
            if left_by_dead_run(path):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        # versions: a renamed one that a killed run never switched to (newer than current) goes; of the
        # older ones the newest KEEP_VERSIONS - 1 stay (a server may still be loading the one just replaced)
        current = self.current()
        versions = sorted(p for p in self.versions.glob("v*") if p.is_dir())  # names sort by time
        older = [p for p in versions if current is not None and p.name < current[0]]
        newer = [p for p in versions if current is None or p.name > current[0]]
        stale = older[:max(0, len(older) - (self.KEEP_VERSIONS - 1))] + [p for p in newer if left_by_dead_run(p)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        for path in removed:
            logger.info(f"removed what an earlier training left: {path}")
        return removed


class ModelService:
    """The Segmenter this process serves, rebuilt when a new model version is published."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        limits.configure(settings.input_limits())
        self.pretrained = pretrained_weights(settings.weights)
        self.store = ModelStore(settings.model_dir)
        self.store.clean()  # a killed training's work folder (patient data) goes at start-up
        self._lock = threading.RLock()  # held while loading and predicting
        self._signature: tuple | None = None
        self._segmenter: Segmenter | None = None
        # what is loaded: replaced as a whole (never mutated), so /info reads it without the lock
        self._served: tuple[list[ServedModel], str] = ([], PRETRAINED)
        self.segmenter()  # load once at start: a broken model fails the start, not the first request

    # ------------------------------------------------------------ which checkpoints
    def published_folder(self, folder: ModelFolder, version_folder: Path) -> Path:
        return Path(version_folder) / folder.dataset / folder.path.name

    def _current(self) -> tuple[list[ServedModel], str]:
        current = self.store.current()
        version, version_folder = current if current else (PRETRAINED, None)
        out = []
        for mf in self.pretrained.models:
            if version_folder is not None:
                pub = self.published_folder(mf, version_folder)
                if (pub / "fold_0" / "checkpoint_final.pth").is_file() and self._derives_from(pub, mf):
                    try:
                        out.append(ServedModel(read_model_folder(pub), True, version))
                        continue
                    except Exception as e:  # a broken publication must not take the pretrained model down
                        logger.error(f"ignoring published model {pub}: {e}")
            out.append(ServedModel(mf, False, version))
        for m in out:
            st = m.folder.checkpoint.stat()
            m.signature = (str(m.folder.checkpoint), st.st_mtime_ns, st.st_size)
        return out, version

    @staticmethod
    def base_record(pretrained: ModelFolder) -> dict:
        """Which pretrained checkpoint a published model descends from (written next to it by the trainer)."""
        return {"pretrained_checkpoint": str(pretrained.checkpoint.resolve()),
                "size": pretrained.checkpoint.stat().st_size}

    def _derives_from(self, published: Path, pretrained: ModelFolder) -> bool:
        """A fine-tune of other pretrained weights (``--conf weights`` changed) is not served."""
        try:
            record = json.loads((published / BASE_FILE).read_text())
        except (OSError, ValueError):
            return False
        if record != self.base_record(pretrained):
            logger.warning(f"not serving {published}: it was fine-tuned from {record.get('pretrained_checkpoint')}, "
                           f"not from the configured {pretrained.checkpoint}")
            return False
        return True

    def segmenter(self) -> Segmenter:
        with self._lock:
            current, version = self._current()
            signature = (version, *(m.signature for m in current))
            if signature != self._signature:
                weights = Weights(source=self.pretrained.source, root=self.pretrained.root,
                                  models=[m.folder for m in current], manifest=self.pretrained.manifest)
                self._segmenter = Segmenter(weights=weights, device=self.settings.device,
                                            threads=self.settings.threads, regions=self.settings.regions,
                                            mode=self.settings.mode)
                loaded = {m.dataset for m in self._segmenter.models}
                self._served = ([m for m in current if m.folder.dataset in loaded], version)
                if self._signature is not None:
                    logger.info(f"reloaded models, version {version}: {[m.describe() for m in self._served[0]]}")
                self._signature = signature
            return self._segmenter

    def served(self) -> list[ServedModel]:
        """The models loaded now (no lock: /info must answer while a prediction runs)."""
        return list(self._served[0])

    def model_version(self) -> str:
        """The published version loaded now (``pretrained`` before any fine-tuning)."""
        return self._served[1]

    def describe(self) -> dict:
        served, version = self._served
        return {
            "pretrained": self.pretrained.describe(),
            "model_dir": str(self.settings.model_dir),
            "model_version": version,
            "models": [m.describe() for m in served],
            "limits": {"max_voxels": self.settings.max_voxels, "max_bytes": self.settings.max_bytes},
        }

    # ------------------------------------------------------------ prediction
    def segment(self, image, dataset: str | None = None, probabilities: bool = False) -> Segmentation:
        return self.segment_versioned(image, dataset, probabilities)[0]

    def segment_versioned(self, image, dataset: str | None = None, probabilities: bool = False
                          ) -> tuple[Segmentation, list[ServedModel], str]:
        """Segment with every served model (``dataset`` None) or one region model; also the models and
        version that made it (read under the same lock, so they cannot be a newer reload's)."""
        with self._lock:
            seg = self.segmenter()
            served, version = self._served
            regions = None
            if dataset is not None:
                model = next((m for m in seg.models if m.dataset == dataset), None)
                if model is None:
                    raise InputError(f"model {dataset} is not served")
                regions = model.folder.regions()
            return seg.segment(image, regions=regions, probabilities=probabilities), list(served), version


def mean_entropy(segmenter: Segmenter, result: Segmentation) -> float:
    """Mean voxel softmax entropy (normalised to 0-1 by log of the class count), averaged over the models run.

    Needs ``result`` made with ``probabilities=True``; each model's background is 1 - its foreground sum.
    """
    if result.probabilities is None:
        raise ValueError("mean_entropy needs a segmentation made with probabilities=True")
    values = []
    for m in segmenter.models:
        if m.dataset not in result.models_run:
            continue
        ids = [s.id for s in m.structures.values() if s.id in result.probabilities]
        if not ids:
            continue
        fg = np.stack([result.probabilities[i] for i in ids]).astype(np.float32)
        p = np.concatenate([np.clip(1.0 - fg.sum(0, keepdims=True), 0.0, 1.0), fg])
        h = -(p * np.log(np.clip(p, 1e-8, 1.0))).sum(0) / np.log(len(ids) + 1)
        values.append(float(h.mean()))
    return float(np.mean(values)) if values else 0.0
