"""Fine-tuned models as versions, the one thing a server, a training run and the CLI all agree on.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from .weights import ModelFolder, Weights, read_model_folder

logger = logging.getLogger(__name__)

BASE_FILE = "mrannotator_base.json"
PRETRAINED = "pretrained"  # the model version name while nothing fine-tuned is published


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

    # ------------------------------------------------------------ what a version serves
    @staticmethod
    def published_folder(folder: ModelFolder, version_folder: Path) -> Path:
        """Where a version keeps its fine-tune of the pretrained model ``folder`` (release layout)."""
        return Path(version_folder) / folder.dataset / folder.path.name

    @staticmethod
    def base_record(pretrained: ModelFolder) -> dict:
        """Which pretrained checkpoint a published model descends from (written next to it by the run)."""
        return {"pretrained_checkpoint": str(pretrained.checkpoint.resolve()),
                "size": pretrained.checkpoint.stat().st_size}

    def derives_from(self, published: Path, pretrained: ModelFolder) -> bool:
        """A fine-tune of other pretrained weights (the configured weights changed) is not served."""
        try:
            record = json.loads((published / BASE_FILE).read_text())
        except (OSError, ValueError):
            return False
        if record != self.base_record(pretrained):
            logger.warning(f"not serving {published}: it was fine-tuned from {record.get('pretrained_checkpoint')}, "
                           f"not from the configured {pretrained.checkpoint}")
            return False
        return True

    def served_models(self, pretrained: Weights) -> tuple[list[ServedModel], str]:
        """For each pretrained model, its fine-tune in the current version if there is a valid one, else
        itself; and the version name (``pretrained`` when nothing is published)."""
        current = self.current()
        version, version_folder = current if current else (PRETRAINED, None)
        out = []
        for mf in pretrained.models:
            if version_folder is not None:
                pub = self.published_folder(mf, version_folder)
                if (pub / "fold_0" / "checkpoint_final.pth").is_file() and self.derives_from(pub, mf):
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

    def served_weights(self, pretrained: Weights) -> tuple[Weights, list[ServedModel], str]:
        """:meth:`served_models` as a :class:`Weights` a Segmenter loads."""
        served, version = self.served_models(pretrained)
        weights = Weights(source=pretrained.source, root=pretrained.root, models=[m.folder for m in served],
                          manifest=pretrained.manifest)
        return weights, served, version
