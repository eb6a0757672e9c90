"""Planning a folder tree: find the NIfTI files and the DICOM series folders anywhere below it, then read the
DICOM headers folder by folder, in Ray tasks when the tree is large.

- :func:`walk` lists the tree once (linear in the number of entries, no file opened): NIfTI files by name,
  sidecars (``.json``, ``.txt``, ``.bval``, ...) counted and ignored, every folder holding other files
  noted with how many (a DICOM candidate folder), dangling links and unreadable folders kept with the reason.
- :func:`scan_folders` reads the headers of the candidate folders handed to it, one folder at a time, without
  pixel data and only the tags the series rules, routing and the cohort table need; each series is checked
  with the project's own series rules (:func:`mrannotator.dicom.ingest.rule_failed`,
  :func:`mrannotator.dicom.stack_geometry`) and described, and its headers are dropped before the next folder.
  A series is expected within one folder (as PACS exports and scanners write them); a folder may hold several.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# files that travel with images but are not images (BIDS sidecars, exports' indexes and notes): ignored, counted
SIDECAR_SUFFIXES = (".json", ".txt", ".bval", ".bvec", ".tsv", ".csv", ".md", ".log", ".xml", ".html", ".htm",
                    ".pdf", ".yaml", ".yml", ".ini", ".png", ".jpg", ".jpeg", ".gif", ".zip")
SIDECAR_NAMES = ("DICOMDIR", "LOCKFILE", "VERSION", "Thumbs.db")
# the header tags planning reads: the series rules, the stack geometry, routing and the cohort table
PLAN_TAGS = ("SeriesInstanceUID", "SOPInstanceUID", "Modality", "ImageType", "SeriesDescription", "SeriesNumber",
             "NumberOfFrames", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
             "InstanceNumber", "PatientAge", "PatientSex", "Manufacturer", "MagneticFieldStrength",
             "BodyPartExamined", "StudyDescription", "ProtocolName")
FILES_PER_TASK = 2000  # DICOM candidate files one planning task reads (whole folders: a big one is one task)


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def is_sidecar(name: str) -> bool:
    return name.startswith(".") or name in SIDECAR_NAMES or name.lower().endswith(SIDECAR_SUFFIXES)


@dataclass
class Tree:
    """What :func:`walk` found below a root (paths absolute, in path order)."""

    niftis: list[str] = field(default_factory=list)
    folders: list[tuple[str, int]] = field(default_factory=list)  # DICOM candidate folder, its candidate files
    sidecars: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of entries that cannot be read
    excluded: list[str] = field(default_factory=list)  # folders left out (OUT inside INPUT)


def walk(root: str, exclude: tuple[str, ...] = ()) -> Tree:
    """One pass over the tree below ``root`` (a folder, or one file); folder links followed once."""
    tree = Tree()
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        counts: dict[str, int] = {}
        _classify(tree, root, os.path.basename(root), counts)
        tree.folders = [(root, 1)] if counts else []  # one DICOM file: scanned on its own
        return tree
    seen = {(st.st_dev, st.st_ino)}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            tree.problems.append((folder, f"unreadable folder ({e.strerror or e})"))
            continue
        counts: dict[str, int] = {}
        subfolders = []
        for e in entries:
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
                key = (e.stat().st_dev, e.stat().st_ino) if is_dir else None
            except OSError as err:
                tree.problems.append((e.path, "symlink loop" if err.errno == 40 else f"unreadable ({err.strerror})"))
                continue
            if is_dir:
                if e.path in exclude:
                    tree.excluded.append(e.path)
                elif key in seen:
                    tree.problems.append((e.path, "symlink loop (a folder already listed)"))
                else:
                    seen.add(key)
                    subfolders.append(e.path)
            elif is_file:
                _classify(tree, e.path, e.name, counts)
            elif e.is_symlink():
                tree.problems.append((e.path, "dangling symlink"))
        if counts.get(folder):
            tree.folders.append((folder, counts[folder]))
        pending.extend(reversed(subfolders))  # depth first, in path order
    return tree


def _classify(tree: Tree, path: str, name: str, counts: dict[str, int]) -> None:
    if is_nifti(name):
        tree.niftis.append(path)
    elif is_sidecar(name):
        tree.sidecars += 1
    else:
        folder = os.path.dirname(path)
        counts[folder] = counts.get(folder, 0) + 1


def chunks(folders: list[tuple[str, int]], per_task: int | None = None) -> list[list[str]]:
    """Folders grouped into tasks of about ``per_task`` (FILES_PER_TASK) files (a larger folder is a task of its
    own)."""
    per_task = per_task or FILES_PER_TASK
    out: list[list[str]] = []
    size = per_task
    for folder, n in folders:
        if size + n > per_task:
            out.append([])
            size = 0
        out[-1].append(folder)
        size += n
    return out


@dataclass
class Found:
    """One DICOM series (accepted or refused) or one unusable file, described without its headers."""

    folder: str  # the series folder (or the file, for an unusable file)
    uid: str = ""
    files: tuple[str, ...] = ()  # slice order (accepted series); every member (refused)
    header: dict[str, str] = field(default_factory=dict)  # PLAN_TAGS as text (no UIDs, positions)
    error: str = ""  # empty: accepted

    @property
    def series_number(self) -> str:
        return self.header.get("SeriesNumber", "")


def scan_folders(folders: list[str]) -> list[tuple[str, list[Found]]]:
    """(folder, every series and every unusable file in it) for each of ``folders`` (each read on its own, not
    recursively; a folder may also be a single file)."""
    return [(folder, _scan_folder(folder)) for folder in folders]


def _candidate_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return [folder]
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and not is_nifti(e.name) and not is_sidecar(e.name))


def _scan_folder(folder: str) -> list[Found]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list] = defaultdict(list)
    seen_sop: dict[str, str] = {}
    found: list[Found] = []
    for path in _candidate_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PLAN_TAGS))
        except InvalidDicomError:
            found.append(Found(path, error="not a DICOM file"))
            continue
        except Exception as e:  # pydicom raises many types for damaged files
            found.append(Found(path, error=f"unreadable DICOM ({type(e).__name__}: {e})"))
            continue
        uid, sop = ds.get("SeriesInstanceUID"), str(ds.get("SOPInstanceUID", ""))
        if not uid:
            found.append(Found(path, error="DICOM without a SeriesInstanceUID (e.g. a DICOMDIR)"))
        elif sop and sop in seen_sop:
            found.append(Found(path, error=f"second copy of the instance in {os.path.basename(seen_sop[sop])}"))
        else:
            seen_sop[sop] = path
            by_series[str(uid)].append((path, ds))
    for uid, members in by_series.items():
        found.append(describe_series(folder, uid, members))
    return found


def describe_series(folder: str, uid: str, members: list) -> Found:
    """Accept or refuse one series by the project's series rules; only text and the file order are kept."""
    from ..dicom import StackError, stack_geometry
    from ..dicom.ingest import describe, rule_failed

    datasets = [ds for _, ds in members]
    header = {k: _text(datasets[0], k) for k in PLAN_TAGS if k not in (
        "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
        "InstanceNumber", "NumberOfFrames", "Rows", "Columns", "ImageType")}
    why = rule_failed(datasets)
    if why is None:
        try:
            order, _ = stack_geometry(datasets)
        except StackError as e:
            why = f"not one 3D stack: {e}"
        else:
            return Found(folder, uid, tuple(members[i][0] for i in order), header)
    return Found(folder, uid, tuple(p for p, _ in members), header, error=f"{describe(datasets)}: {why}")


def _text(ds, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    return "" if value is None else str(value).strip()


def relative_parts(path: str, root: str) -> list[str]:
    rel = os.path.relpath(path, root)
    return [] if rel == "." else list(Path(rel).parts)
