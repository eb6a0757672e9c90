"""The DICOM results of one run, as the MAP and the CLI write them: the SEG and its TID 1500 volume report.

    written = write_dicom_results(out_dir, result, image, series, input_root=..., model=...)

Both files go through a temporary name, fsync and rename. Their SeriesNumbers are chosen free in the
source study as it is in the input: 1000 + the source's SeriesNumber when no series of the study has it
(the usual convention), else the next free number above it; the SR takes the next free number after the
SEG. Other studies in the input folder do not count.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
from pydicom.dataset import Dataset

SEG_NAME = "seg.dcm"
SR_NAME = "sr.dcm"
SERIES_NUMBER_LIMIT = 2**31 - 1


@dataclass
class ModelIdentity:
    """Who made the labels (IHE AIR model identity): written into the SEG and the SR, and the audit."""

    creator: str = "MRAnnotator project"
    name: str = "MRAnnotator nnU-Net v2"
    version: str | None = None
    device_uid: str | None = None


@dataclass
class DicomResult:
    """One DICOM file written: where, and what it is (no patient data)."""

    kind: str  # "SEG" or "SR"
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    series_number: int
    sha256: str

    def as_dict(self) -> dict:
        return asdict(self)


def checkpoint_digests(segmenter) -> dict[str, str]:
    """{dataset: SHA-256 of its checkpoint}: which weights ran, exactly."""
    digests = {}
    for m in segmenter.models:
        h = hashlib.sha256()
        with open(m.folder.checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[m.dataset] = h.hexdigest()
    return digests


def model_identity(segmenter, digests: dict[str, str] | None = None) -> ModelIdentity:
    """IHE AI Results model identity. The Device UID is derived from the checkpoints' SHA-256, so it
    changes whenever the weights change and is the same for every run (CLI or MAP) with the same weights."""
    from pydicom.uid import generate_uid

    from .. import __version__

    digests = digests or checkpoint_digests(segmenter)
    return ModelIdentity(
        creator="MRAnnotator project",
        name=f"MRAnnotator nnU-Net v2 ({segmenter.weights.source} weights)",
        version=__version__,
        device_uid=generate_uid(entropy_srcs=[f"{k}:{v}" for k, v in digests.items()]),
    )


def audit_weights(segmenter, digests: dict[str, str]) -> dict:
    """What the audit record says about the weights: source, version, models, checkpoints' SHA-256."""
    return {**segmenter.weights.describe(), "version": segmenter.weights.manifest.get("version"), "sha256": digests}


def study_series_numbers(root: str | Path, study_uid: str) -> set[int]:
    """SeriesNumbers of every series of ``study_uid`` under ``root`` (headers only; unreadable files skipped)."""
    import pydicom

    root = Path(root)
    files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())
    numbers = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesNumber"])
        except Exception:  # noqa: BLE001 - not DICOM (DICOMDIR, README, ...): not a series of the study
            continue
        if str(ds.get("StudyInstanceUID", "")) == study_uid and ds.get("SeriesNumber") not in (None, ""):
            numbers.add(int(ds.SeriesNumber))
    return numbers


def free_series_numbers(source_number: int, taken: set[int], count: int = 2) -> list[int]:
    """``count`` numbers not in ``taken``, from 1000 + ``source_number`` up (wrapping to 1 past 2^31 - 1)."""
    out, n = [], 1000 + max(int(source_number), 0)
    while len(out) < count:
        if n > SERIES_NUMBER_LIMIT:
            n = 1
        if n not in taken and n not in out:
            out.append(n)
        n += 1
    return out


def _save(ds: Dataset, path: Path) -> str:
    """Write ``ds`` at ``path`` crash-safely (temp file, fsync, rename); returns its SHA-256."""
    from ..imageio import write_atomic

    def write(tmp):
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    write_atomic(path, write)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(kind: str, ds: Dataset, path: Path, digest: str) -> DicomResult:
    return DicomResult(kind, str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                       int(ds.SeriesNumber), digest)


def write_dicom_results(
    out_dir: str | Path,
    result,
    image: nib.Nifti1Image,
    datasets: list[Dataset],
    affine,
    *,
    input_root: str | Path | None = None,
    model: ModelIdentity | None = None,
    prefix: str = "mrannotator_",
) -> list[DicomResult]:
    """SEG + SR of ``result`` (a :class:`~mrannotator.Segmentation` of ``image``) into ``out_dir``.

    ``datasets``/``affine``: the source series in slice order (a :class:`~mrannotator.dicom.Series`).
    Returns [] and writes nothing when no structure was found (a SEG needs a segment).
    """
    from .seg import make_seg
    from .sr import make_sr

    if not result.structures:
        return []
    model = model or ModelIdentity()
    first = datasets[0]
    taken = study_series_numbers(input_root, str(first.StudyInstanceUID)) if input_root else set()
    taken.add(int(getattr(first, "SeriesNumber", 0) or 0))
    seg_number, sr_number = free_series_numbers(int(getattr(first, "SeriesNumber", 0) or 0), taken)
    seg = make_seg(result.labels, result.structures, datasets, weights=result.weights, model_creator=model.creator,
                   model_name=model.name, model_version=model.version, device_uid=model.device_uid,
                   series_number=seg_number, source_affine=affine)
    rows = result.summary()["structures"]
    sr = make_sr(seg, rows, image, result.labels, datasets, series_number=sr_number, version=model.version,
                 device_uid=model.device_uid)
    out_dir = Path(out_dir)
    written = []
    for kind, ds, name in (("SEG", seg, SEG_NAME), ("SR", sr, SR_NAME)):
        path = out_dir / f"{prefix}{name}"
        written.append(_record(kind, ds, path, _save(ds, path)))
    return written
