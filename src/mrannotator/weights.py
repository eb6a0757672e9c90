"""Model weights: find, validate, install and list nnU-Net v2 trained-model folders.

A release is one or more folders laid out like the official MRAnnotator release::

    Dataset001_Abdomen/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

Without installed weights the demo weights shipped with the package (``models/demo`` in the
repository) are used. Checkpoints are full pickles: load only weights you chose to trust
(``weights install`` is that choice).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .catalogue import load_catalogue
from .errors import WeightsError

CHECKPOINT = "checkpoint_final.pth"
FOLD = 0
FOLDER_NAME = "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"  # the official release's trainer folder
# Orientation each known model expects its input in (nibabel axis codes). The official release and
# our demo weights expect LAS; a dataset.json may say otherwise with "mrannotator_orientation".
DEFAULT_ORIENTATION = "LAS"
_TRAINER_DIR = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<config>3d_fullres)$")
_DATASET_DIR = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>.+)$")


def mrannotator_home() -> Path:
    env = os.environ.get("MRANNOTATOR_HOME")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("mrannotator"))


def demo_weights_dir() -> Path:
    """The demo weights: package data (``mrannotator/demo_weights``), or ``$MRANNOTATOR_DEMO_WEIGHTS``.

    In a wheel they are files of the package; in a source checkout ``demo_weights`` is a link to the
    top-level ``models/demo`` (the release layout, where the training script writes them).
    """
    env = os.environ.get("MRANNOTATOR_DEMO_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "demo_weights"


@dataclass(frozen=True)
class ModelFolder:
    """One nnU-Net trained-model folder (one dataset, one trainer/plans/configuration)."""

    path: Path
    dataset_id: int
    dataset_name: str
    trainer: str
    labels: dict[str, int]  # dataset.json labels without background
    orientation: str = DEFAULT_ORIENTATION

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    @property
    def checkpoint(self) -> Path:
        return self.path / f"fold_{FOLD}" / CHECKPOINT

    def regions(self) -> list[str]:
        cat = load_catalogue()
        found = {s.region for n in self.labels if (s := cat.find(n))}
        return sorted(found)


@dataclass
class Weights:
    """A set of region models and where they came from (said in every output)."""

    source: str  # "demo", "official" (installed) or "path"
    root: Path
    models: list[ModelFolder]
    manifest: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "root": str(self.root),
            "models": [m.dataset for m in self.models],
            "installed": self.manifest.get("installed"),
            "demo": self.source == "demo",
        }


def read_model_folder(path: Path, strict_labels: bool = False) -> ModelFolder:
    """Validate one trained-model folder; raise :class:`WeightsError` naming what is wrong."""
    path = Path(path)
    m = _TRAINER_DIR.match(path.name)
    d = _DATASET_DIR.match(path.parent.name)
    if not m or not d:
        raise WeightsError(
            f"{path} is not an nnU-Net trained-model folder: expected DatasetXXX_Name/"
            "TRAINER__PLANS__3d_fullres"
        )
    for f in ("dataset.json", "plans.json"):
        if not (path / f).is_file():
            raise WeightsError(f"{path.parent.name}: {f} is missing in {path}")
    ck = path / f"fold_{FOLD}" / CHECKPOINT
    if not ck.is_file():
        raise WeightsError(f"{path.parent.name}: checkpoint missing: {ck} (the release must contain fold {FOLD})")
    if ck.stat().st_size < 1024:
        raise WeightsError(f"{path.parent.name}: checkpoint {ck} is truncated ({ck.stat().st_size} bytes)")
    try:
        dj = json.loads((path / "dataset.json").read_text())
        json.loads((path / "plans.json").read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path.parent.name}: unreadable JSON in {path}: {e}") from e
    labels = dj.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise WeightsError(f"{path.parent.name}: dataset.json has no 'labels'")
    labels = {k: int(v) for k, v in labels.items() if int(v) != 0}
    cat = load_catalogue()
    unknown = [n for n in labels if cat.find(n) is None]
    if unknown and strict_labels:
        raise WeightsError(
            f"{path.parent.name}: dataset.json label(s) {unknown} are not in the MRAnnotator label catalogue; "
            "use --allow-unknown-labels to install anyway (they are then served with a generic code)"
        )
    return ModelFolder(
        path=path,
        dataset_id=int(d["id"]),
        dataset_name=d["name"],
        trainer=m["trainer"],
        labels=labels,
        orientation=str(dj.get("mrannotator_orientation", DEFAULT_ORIENTATION)),
    )


def find_model_folders(root: Path, strict_labels: bool = False) -> list[ModelFolder]:
    """Every trained-model folder at most three levels below ``root`` (or ``root`` itself)."""
    root = Path(root)
    if not root.exists():
        raise WeightsError(f"weights folder not found: {root}")
    if _TRAINER_DIR.match(root.name):
        return [read_model_folder(root, strict_labels)]
    candidates = []
    for depth in ("*/*", "*/*/*", "*/*/*/*"):
        for p in sorted(root.glob(depth)):
            if p.is_dir() and _TRAINER_DIR.match(p.name) and _DATASET_DIR.match(p.parent.name):
                candidates.append(p)
        if candidates:
            break
    if not candidates:
        raise WeightsError(
            f"no nnU-Net model in {root}: expected DatasetXXX_Name/TRAINER__PLANS__3d_fullres/fold_0/{CHECKPOINT}"
        )
    models = [read_model_folder(p, strict_labels) for p in candidates]
    seen: dict[int, Path] = {}
    for mf in models:
        if mf.dataset_id in seen:
            raise WeightsError(
                f"two models for dataset {mf.dataset_id:03d} in {root}: {seen[mf.dataset_id]}, {mf.path}"
            )
        seen[mf.dataset_id] = mf.path
    return models


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_dir(home: Path | None = None) -> Path:
    return (home or mrannotator_home()) / "weights" / "official"


def install(source: Path, home: Path | None = None, allow_unknown_labels: bool = False) -> Weights:
    """Validate a release (zip or folder) and install it under ``$MRANNOTATOR_HOME/weights/official``.

    Nothing is changed if the release is refused; a previous installation is replaced only once the
    new one is complete and verified.
    """
    source = Path(source)
    if not source.exists():
        raise WeightsError(f"release not found: {source}")
    dest = installed_dir(home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=dest.parent))
    try:
        unpacked = staging / "release"
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise WeightsError(f"{source} is neither a folder nor a zip archive")
            with zipfile.ZipFile(source) as z:
                bad = z.testzip()
                if bad:
                    raise WeightsError(f"{source} is corrupt: {bad} fails its CRC check")
                z.extractall(unpacked)
        else:
            shutil.copytree(source, unpacked)
        models = find_model_folders(unpacked, strict_labels=not allow_unknown_labels)
        final = staging / "official"
        final.mkdir()
        files = {}
        for mf in models:
            target = final / mf.dataset / mf.path.name
            target.mkdir(parents=True)
            for f in ("dataset.json", "plans.json"):
                shutil.copy2(mf.path / f, target / f)
            (target / f"fold_{FOLD}").mkdir()
            shutil.copy2(mf.checkpoint, target / f"fold_{FOLD}" / CHECKPOINT)
            for f in sorted(target.rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(final))] = _sha256(f)
        manifest = {
            "installed": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": str(source.resolve()),
            "models": [mf.dataset for mf in models],
            "sha256": files,
        }
        (final / "manifest.json").write_text(json.dumps(manifest, indent=2))
        old = None
        if dest.exists():
            old = staging / "previous"
            dest.rename(old)
        final.rename(dest)
        return load_weights(dest, source_kind="official")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify(weights: Weights) -> list[str]:
    """Files whose checksum no longer matches the install manifest (empty when intact)."""
    bad = []
    for rel, digest in weights.manifest.get("sha256", {}).items():
        f = weights.root / rel
        if not f.is_file() or _sha256(f) != digest:
            bad.append(rel)
    return bad


def load_weights(path: Path | None = None, source_kind: str | None = None) -> Weights:
    """The weights to use: ``path`` if given, else the installed release, else the demo weights."""
    if path is None:
        inst = installed_dir()
        if (inst / "manifest.json").is_file():
            path, source_kind = inst, "official"
        else:
            path, source_kind = demo_weights_dir(), "demo"
    path = Path(path)
    if source_kind is None:
        resolved = path.resolve()
        source_kind = (
            "demo" if resolved == demo_weights_dir().resolve()
            else "official" if resolved == installed_dir().resolve() else "path"
        )
    if path.is_dir() and not any(path.iterdir()):
        raise WeightsError(f"weights folder {path} is empty")
    models = find_model_folders(path)
    manifest = {}
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
    return Weights(source=source_kind, root=path, models=sorted(models, key=lambda m: m.dataset_id),
                   manifest=manifest)


def list_weights() -> list[dict]:
    """What is available: the installed release (with integrity) and the demo weights."""
    out = []
    inst = installed_dir()
    if (inst / "manifest.json").is_file():
        w = load_weights(inst, "official")
        out.append({**w.describe(), "intact": not verify(w), "active": True})
    demo = demo_weights_dir()
    if demo.exists():
        w = load_weights(demo, "demo")
        out.append({**w.describe(), "active": not out})
    return out
