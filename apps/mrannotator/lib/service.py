"""The engine as this app serves it: settings from ``--conf``, one Segmenter per process, hot reload.

Fine-tuned checkpoints are published into ``model_dir`` with the release layout
(``model_dir/DatasetXXX_Name/TRAINER__PLANS__3d_fullres/fold_0/checkpoint_final.pth``). A published
folder replaces the pretrained one of the same dataset; before every prediction the service compares
the checkpoints' (path, mtime, size) with those it loaded and reloads the models when one changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrannotator.catalogue import region_names
from mrannotator.engine import Segmentation, Segmenter
from mrannotator.errors import InputError
from mrannotator.weights import ModelFolder, Weights, demo_weights_dir, installed_dir, load_weights, read_model_folder

logger = logging.getLogger(__name__)

BASE_FILE = "mrannotator_base.json"

CONF_OPTIONS = {
    "weights": "auto (installed official weights, else the demo weights), demo, official, or a folder",
    "regions": f"all, or a comma-separated list of regions/aliases ({', '.join(region_names())})",
    "device": "auto, cpu or cuda",
    "mode": "exact (default: labels as stock nnU-Net) or fast (bf16 on CPUs with native bf16, fp16 on CUDA)",
    "threads": "CPU threads for torch (default: torch's choice)",
    "model_dir": "where fine-tuned checkpoints are published (default: APP_DIR/model)",
    "epochs": "fine-tuning epochs per run (default 3)",
    "iterations": "training iterations per epoch (default 10)",
    "val_iterations": "validation iterations per epoch (default 2)",
    "learning_rate": "initial learning rate of the fine-tuning (default 0.01 as nnU-Net, poly decay)",
    "reserve_seconds": "how long an image handed out by a strategy is kept from other annotators (default 600)",
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
    epochs: int = 3
    iterations: int = 10
    val_iterations: int = 2
    learning_rate: float = 1e-2
    reserve_seconds: int = 600

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
            epochs=_int(conf, "epochs", 3),
            iterations=_int(conf, "iterations", 10),
            val_iterations=_int(conf, "val_iterations", 2),
            learning_rate=_float(conf, "learning_rate", 1e-2),
            reserve_seconds=_int(conf, "reserve_seconds", 600, minimum=0),
        )


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
    signature: tuple = field(default=())

    def describe(self) -> dict:
        ck = self.folder.checkpoint
        st = ck.stat()
        return {
            "dataset": self.folder.dataset,
            "checkpoint": str(ck),
            "finetuned": self.finetuned,
            "modified": int(st.st_mtime),
            "size": st.st_size,
            "version": hashlib.sha1(f"{ck}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:12],
        }


class ModelService:
    """The Segmenter this process serves, rebuilt when a fine-tuned checkpoint is published."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.pretrained = pretrained_weights(settings.weights)
        self._lock = threading.RLock()
        self._signature: tuple | None = None
        self._segmenter: Segmenter | None = None
        self._served: list[ServedModel] = []
        self.segmenter()  # load once at start: a broken model fails the start, not the first request

    # ------------------------------------------------------------ which checkpoints
    def published_folder(self, folder: ModelFolder) -> Path:
        return self.settings.model_dir / folder.dataset / folder.path.name

    def _current(self) -> list[ServedModel]:
        out = []
        for mf in self.pretrained.models:
            pub = self.published_folder(mf)
            if (pub / "fold_0" / "checkpoint_final.pth").is_file() and self._derives_from(pub, mf):
                try:
                    out.append(ServedModel(read_model_folder(pub), True))
                    continue
                except Exception as e:  # a broken publication must not take the pretrained model down
                    logger.error(f"ignoring published model {pub}: {e}")
            out.append(ServedModel(mf, False))
        for m in out:
            st = m.folder.checkpoint.stat()
            m.signature = (str(m.folder.checkpoint), st.st_mtime_ns, st.st_size)
        return out

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
            current = self._current()
            signature = tuple(m.signature for m in current)
            if signature != self._signature:
                weights = Weights(source=self.pretrained.source, root=self.pretrained.root,
                                  models=[m.folder for m in current], manifest=self.pretrained.manifest)
                self._segmenter = Segmenter(weights=weights, device=self.settings.device,
                                            threads=self.settings.threads, regions=self.settings.regions,
                                            mode=self.settings.mode)
                loaded = {m.dataset for m in self._segmenter.models}
                self._served = [m for m in current if m.folder.dataset in loaded]
                if self._signature is not None:
                    logger.info(f"reloaded models: {[m.describe() for m in self._served]}")
                self._signature = signature
            return self._segmenter

    def served(self) -> list[ServedModel]:
        with self._lock:
            return list(self._served)

    def describe(self) -> dict:
        return {
            "pretrained": self.pretrained.describe(),
            "model_dir": str(self.settings.model_dir),
            "models": [m.describe() for m in self.served()],
        }

    # ------------------------------------------------------------ prediction
    def segment(self, image, dataset: str | None = None, probabilities: bool = False) -> Segmentation:
        """Segment with every served model (``dataset`` None) or with one region model only."""
        with self._lock:
            seg = self.segmenter()
            regions = None
            if dataset is not None:
                model = next((m for m in seg.models if m.dataset == dataset), None)
                if model is None:
                    raise InputError(f"model {dataset} is not served")
                regions = model.folder.regions()
            return seg.segment(image, regions=regions, probabilities=probabilities)


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
