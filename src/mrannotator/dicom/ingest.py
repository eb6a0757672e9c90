"""The one way MRAnnotator reads DICOM: find the series of a folder tree, choose, read one volume.

    scan = find_series(root)     # every file's header read once; each series split and sorted once
                                 # (root: a folder tree, one file, or a DICOMDIR whose files are followed)
    scan.series                  # accepted MR series, largest (voxels) first
    scan.rejected                # Rejected(series_uid, description, reason) for every other series
    scan.skipped                 # (path, reason): not DICOM, unreadable, dangling symlink, symlink loop
    img = load_series(scan.series[0])   # nibabel image, RAS affine from the normalised cosines
    img = read_dicom(root, series_uid=None)   # all of the above; InputError naming the problem

The series rules, in order (the first that fails is the reason): MR only; no localizer / scout; no
derived image (ImageType ORIGINAL only); single-frame instances; greyscale (MONOCHROME2, or MONOCHROME1,
inverted on reading), no Siemens MOSAIC; at least MIN_SLICES slices; split into 3D stacks (echoes,
b-values, time points, acquisitions: :mod:`.stacks`; ``stack=`` picks one, default the first; a duplicated
slice is named); the stack one evenly spaced stack of parallel slices of one size (a missing slice shows
as a gap); its InstanceNumbers start at 1 and reach ImagesInAcquisition where written (a missing first or
last slice; ``ignore_instance_gaps=True`` accepts it). Pixel data is decoded by pydicom with the pylibjpeg
plugins (JPEG Lossless, JPEG-LS, JPEG 2000; RLE, deflate and big endian natively), with the modality rescale.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from .geometry import StackError, stack_geometry
from .listing import Skipped, list_files
from .stacks import image_rule_failed, invert_monochrome1, parse_stack, pick_stack, split_stacks, stack_problem

log = logging.getLogger(__name__)

MIN_SLICES = 10
SKIP_IMAGE_TYPES = {"LOCALIZER", "SCOUT"}
LOCALIZER_DESCRIPTION = re.compile(r"(?i)\b(localizer|localiser|scout|survey|3[- ]?pl(ane)?|tri[- ]?pilot|loc)\b")


@dataclass(frozen=True)
class Rejected:
    """A series that is not segmented, and why."""

    series_uid: str
    description: str
    reason: str


@dataclass
class Series:
    """One accepted series: files and headers (no pixels) in slice order, and its RAS affine."""

    uid: str
    files: list[Path]
    datasets: list[Dataset]  # headers, slice k of the volume = datasets[k]
    affine: np.ndarray
    stack: str = ""  # the stack's key (e.g. "echo=1") when the series holds several, else ""
    stacks: tuple[str, ...] = ()  # every stack's key, the default first (empty: one stack)

    @property
    def header(self) -> Dataset:
        """The first slice's header: patient, study, series and equipment metadata."""
        return self.datasets[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.header.Columns), int(self.header.Rows), len(self.files)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def description(self) -> str:
        if not self.stack:
            return describe(self.datasets)
        return f"{describe(self.datasets)} stack {self.stack} (stacks: {', '.join(self.stacks)})"


@dataclass
class SeriesScan:
    """What :func:`find_series` found under ``root``."""

    root: Path
    series: list[Series] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per series: a candidate, or the reason it is not (for logs)."""
        lines = [f"{s.description}: candidate" for s in self.series]
        return lines + [f"{r.description}: {r.reason}" for r in self.rejected]

    def choose(self, series_uid: str | None = None) -> Series:
        """The series to segment: ``series_uid`` if given, else the largest; InputError naming why not."""
        if series_uid is None:
            if self.series:
                return self.series[0]
            raise InputError(self._nothing_message())
        for s in self.series:
            if s.uid == series_uid:
                return s
        for r in self.rejected:
            if r.series_uid == series_uid:
                raise InputError(f"series {series_uid} in {self.root} cannot be segmented: {r.reason}")
        known = [s.uid for s in self.series] + [r.series_uid for r in self.rejected]
        raise InputError(f"series {series_uid} not found in {self.root}; series there: {', '.join(known) or 'none'}")

    def _nothing_message(self) -> str:
        skipped = "\n  ".join(f"skipped {p}: {why}" for p, why in self.skipped[:20])
        if len(self.skipped) > 20:
            skipped += f"\n  ... and {len(self.skipped) - 20} more skipped"
        if not self.rejected:
            return f"no DICOM series found in {self.root}" + (f"\n  {skipped}" if skipped else "")
        found = "\n  ".join(f"{r.description}: {r.reason}" for r in self.rejected)
        return f"no MR series to segment in {self.root}; series found:\n  {found}" + (
            f"\n  {skipped}" if skipped else "")


def describe(datasets: list[Dataset]) -> str:
    ds = datasets[0]
    return (f"series {getattr(ds, 'SeriesNumber', '?')} '{getattr(ds, 'SeriesDescription', '') or ''}' "
            f"({getattr(ds, 'Modality', '?')}, {len(datasets)} images, {getattr(ds, 'SeriesInstanceUID', '?')})")


def _read_headers(files: list[Path], skipped: list[Skipped]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers (no pixel data) grouped by SeriesInstanceUID; unusable files go to ``skipped``."""
    by_series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    seen_sop: dict[str, Path] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append((path, "not a DICOM file"))
            continue
        except Exception as e:  # pydicom raises many types for damaged files
            skipped.append((path, f"unreadable DICOM ({type(e).__name__}: {e})"))
            continue
        uid, sop = ds.get("SeriesInstanceUID"), str(ds.get("SOPInstanceUID", ""))
        if not uid:
            skipped.append((path, "DICOM without a SeriesInstanceUID (e.g. a DICOMDIR)"))
        elif sop and sop in seen_sop:
            skipped.append((path, f"second copy of the instance in {seen_sop[sop]}"))
        else:
            seen_sop[sop] = path
            by_series[str(uid)].append((path, ds))
    return by_series


def rule_failed(datasets: list[Dataset]) -> str | None:
    """The first series rule (other than the stack geometry) that ``datasets`` fail, or None."""
    ds = datasets[0]
    modality = str(getattr(ds, "Modality", "") or "unknown")
    if modality != "MR":
        return f"modality {modality}: MRAnnotator segments MR only"
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    if SKIP_IMAGE_TYPES & set(image_type) or LOCALIZER_DESCRIPTION.search(str(getattr(ds, "SeriesDescription", ""))):
        return "localizer / scout"
    if image_type and (image_type[0] != "ORIGINAL" or "SECONDARY" in image_type[1:2]):
        return "derived image (ImageType " + "\\".join(image_type) + ")"
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets):
        return "multi-frame (enhanced) instances: export the series as single-frame images"
    if any("Rows" not in d or "Columns" not in d for d in datasets):
        return "instances without an image (no Rows / Columns)"
    why = image_rule_failed(datasets)
    if why is None and len(datasets) < MIN_SLICES:
        return f"only {len(datasets)} slices (a 3D series has at least {MIN_SLICES})"
    return why


GAP_OVERRIDE = ("; if the stack is complete (e.g. renumbered by an export), segment it with --ignore-instance-gaps "
                "(MAP: MRANNOTATOR_IGNORE_INSTANCE_GAPS=1)")


def _stack_of(uid: str, members: list[tuple[Path, Dataset]], stack: str | None, ignore_gaps: bool) -> Series | str:
    """The chosen 3D stack of an accepted series, sorted once; or why it cannot be segmented."""
    datasets = [ds for _, ds in members]
    try:
        stacks = split_stacks(datasets)
    except StackError as e:
        return str(e)
    chosen = pick_stack(stacks, stack)
    if isinstance(chosen, str):
        return chosen
    part = [datasets[i] for i in chosen.indices]
    where = f" in stack {chosen.key}" if chosen.key else ""
    if len(part) < MIN_SLICES:
        return f"only {len(part)} slices{where} (a 3D series has at least {MIN_SLICES})"
    try:
        order, affine = stack_geometry(part)  # the one sort of this stack
    except StackError as e:
        return f"not one 3D stack{where}: {e}"
    problem = None if ignore_gaps else stack_problem(stacks, chosen, datasets)
    if problem:
        return problem + GAP_OVERRIDE
    files = [members[chosen.indices[i]][0] for i in order]
    return Series(uid, files, [part[i] for i in order], affine, chosen.key,
                  tuple(s.key for s in stacks) if chosen.key else ())


def _accept(uid: str, members: list[tuple[Path, Dataset]], stack: str | None, ignore_gaps: bool
            ) -> Series | Rejected:
    datasets = [ds for _, ds in members]
    why = rule_failed(datasets)
    if why is None:
        result = _stack_of(uid, members, stack, ignore_gaps)
        if isinstance(result, Series):
            return result
        why = result
    return Rejected(uid, describe(datasets), why)


def find_series(root: str | Path, *, stack: str | None = None, ignore_instance_gaps: bool = False) -> SeriesScan:
    """Every series under ``root`` (a folder tree, one file, or a DICOMDIR), checked against the series rules.

    ``stack`` picks the 3D stack of series that hold several (e.g. ``echo=2``, ``b=1000``, ``time=3``; default
    the first); ``ignore_instance_gaps`` accepts stacks whose InstanceNumbers miss the first or last slice.
    Never stops early: files that cannot be used are in ``skipped`` with the reason.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"input not found: {root}")
    parse_stack(stack)  # a malformed key is refused before anything is read
    files, skipped = list_files(root)
    scan = SeriesScan(root, skipped=skipped)
    for uid, members in _read_headers(files, scan.skipped).items():
        result = _accept(uid, members, stack, ignore_instance_gaps)
        (scan.series if isinstance(result, Series) else scan.rejected).append(result)
    scan.series.sort(key=lambda s: (-s.voxels, -len(s.files), int(getattr(s.header, "SeriesNumber", 0) or 0)))
    return scan


def _identity_rescale(datasets: list[Dataset]) -> bool:
    return all(float(d.get("RescaleSlope", 1) or 1) == 1 and float(d.get("RescaleIntercept", 0) or 0) == 0
               for d in datasets) and not any(d.get("ModalityLUTSequence") for d in datasets)


def _decode(path: Path, rescale: bool) -> np.ndarray:
    """One slice's pixels, MONOCHROME1 inverted to the MR convention, with the modality rescale."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # changed or damaged since find_series read its header
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    try:
        frame = ds.pixel_array
    except Exception as e:  # a decoder missing, or damaged pixel data: name the file and its syntax
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        raise InputError(f"cannot decode the pixel data of {path} ({name}): {type(e).__name__}: {e}") from e
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        frame = invert_monochrome1(frame, ds)
    return pydicom.pixels.apply_rescale(frame, ds).astype(np.float32) if rescale else frame


def load_series(series: Series) -> nib.Nifti1Image:
    """The volume of an accepted series, slices in the order :func:`find_series` sorted them."""
    rescale = not _identity_rescale(series.datasets)
    nx, ny, nz = series.shape
    volume = None
    for k, path in enumerate(series.files):
        frame = _decode(path, rescale)
        if frame.shape != (ny, nx):
            raise InputError(f"{path} decodes to {frame.shape} pixels, its header says {(ny, nx)}")
        if volume is None:
            volume = np.empty((nx, ny, nz), frame.dtype)
        volume[:, :, k] = frame.T  # (row, column) -> (i = column, j = row)
    img = nib.Nifti1Image(volume, series.affine)
    # scanner frame; the in-memory affine keeps float64 (the header's copy is float32)
    img.set_qform(series.affine, code=1, update_affine=False)
    img.set_sform(series.affine, code=1, update_affine=False)
    return img


def report(scan: SeriesScan, logger: logging.Logger = log) -> None:
    """Log every series found (info) and every path skipped (warning: a file may be missing)."""
    for line in scan.notes():
        logger.info(line)
    for p, why in scan.skipped:
        logger.warning(f"DICOM input: skipped {p}: {why}")


def read_dicom(path: str | Path, series_uid: str | None = None, *, stack: str | None = None,
               ignore_instance_gaps: bool = False) -> nib.Nifti1Image:
    """The volume of the chosen series under ``path`` (``series_uid``, else the largest accepted one).

    ``stack`` and ``ignore_instance_gaps`` as in :func:`find_series`. Raises :class:`InputError` naming the
    problem: nothing DICOM, no acceptable MR series (each series with its reason), an incomplete stack, a
    series UID not found.
    """
    scan = find_series(path, stack=stack, ignore_instance_gaps=ignore_instance_gaps)
    report(scan)
    series = scan.choose(series_uid)
    log.info(f"reading {series.description}")
    return load_series(series)
