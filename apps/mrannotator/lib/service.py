"""The engine as this app serves it: settings from ``--conf``, one Segmenter per process, hot reload.

Fine-tuned checkpoints are published as whole versions of a :class:`mrannotator.modelstore.ModelStore`
(``model_dir/versions/<version>``, ``model_dir/current``). Before every prediction the service compares
what ``current`` names with what it loaded and reloads when it changed; ``/info`` and every infer
result name the version actually loaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from mrannotator import limits
from mrannotator.catalogue import region_names
from mrannotator.engine import Segmentation, Segmenter
from mrannotator.errors import InputError
from mrannotator.modelstore import PRETRAINED, ModelStore, ServedModel
from mrannotator.training import DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_VAL_ITERATIONS
from mrannotator.uncertainty import mean_entropy  # noqa: F401 (the app's strategies and infer import it here)
from mrannotator.weights import Weights, demo_weights_dir, installed_dir, load_weights

logger = logging.getLogger(__name__)


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


def _number(conf: dict, key: str, default, parse, what: str, valid, rule: str):
    """``--conf key`` parsed with ``parse`` (``default`` when unset); ValueError naming the key otherwise."""
    raw = conf.get(key)
    if raw in (None, ""):
        return default
    try:
        value = parse(str(raw))
    except ValueError:
        raise ValueError(f"--conf {key} {raw!r}: expected {what}") from None
    if not valid(value):
        raise ValueError(f"--conf {key} {raw!r}: {rule}")
    return value


def _int(conf: dict, key: str, default: int | None, minimum: int = 1) -> int | None:
    return _number(conf, key, default, int, "a whole number", lambda v: v >= minimum, f"must be at least {minimum}")


def _mode(conf: dict) -> str:
    mode = str(conf.get("mode") or "exact").strip().lower()
    if mode not in ("exact", "fast"):
        raise ValueError(f"--conf mode {mode!r}: expected exact or fast")
    return mode


def _float(conf: dict, key: str, default: float) -> float:
    return _number(conf, key, default, float, "a number", lambda v: v > 0, "must be positive")


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
    def segmenter(self) -> Segmenter:
        with self._lock:
            weights, current, version = self.store.served_weights(self.pretrained)
            signature = (version, *(m.signature for m in current))
            if signature != self._signature:
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
