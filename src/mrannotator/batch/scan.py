"""Planning a folder tree: find the NIfTI files and the DICOM series folders anywhere below it, then read the
DICOM headers folder by folder, in Ray tasks when the tree is large.

- :func:`walk` lists the tree once (linear in the number of entries, no file opened): NIfTI files by name,
  sidecars (``.json``, ``.txt``, ``.bval``, ...) counted and ignored, every folder holding other files
  noted with how many (a DICOM candidate folder), dangling links and unreadable folders kept with the reason.
- :func:`scan_folders` reads the candidate folders handed to it, one folder at a time (not recursively), through
  the project's one DICOM reader (:func:`mrannotator.dicom.find_series`: headers without pixel data, its series
  rules and reasons); each series is described in a few strings and its headers are dropped before the next
  folder.
  A series is expected within one folder (as PACS exports and scanners write them); a folder may hold several.
  A series whose files are spread over several folders is refused by the planner (``inputs.SPLIT_SERIES``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# files that travel with images but are not images (BIDS sidecars, exports' indexes and notes): ignored, counted
SIDECAR_SUFFIXES = (".json", ".txt", ".bval", ".bvec", ".tsv", ".csv", ".md", ".log", ".xml", ".html", ".htm",
                    ".pdf", ".yaml", ".yml", ".ini", ".png", ".jpg", ".jpeg", ".gif", ".zip")
SIDECAR_NAMES = ("DICOMDIR", "LOCKFILE", "VERSION", "Thumbs.db")
# the header fields a case keeps (routing and the cohort table; no names, ids or dates)
HEADER_TAGS = ("SeriesDescription", "SeriesNumber", "PatientAge", "PatientSex", "Manufacturer",
               "MagneticFieldStrength", "BodyPartExamined", "StudyDescription", "ProtocolName")
_DESCRIBED = re.compile(r"^series (\S+) '(.*?)' \(")  # mrannotator.dicom's description of a series
FILES_PER_TASK = 2000  # DICOM candidate files one planning task reads (whole folders: a big one is one task)
FIRST_TASK_FILES = 200  # the first task's share: the first cases are planned (and dispatched) soon


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


def chunks(folders: list[tuple[str, int]], per_task: int | None = None, first: int | None = None) -> list[list[str]]:
    """Folders grouped into tasks of about ``per_task`` (FILES_PER_TASK) files, the first of about ``first`` files
    (a larger folder is a task of its own)."""
    per_task = per_task or FILES_PER_TASK
    out: list[list[str]] = []
    size = limit = per_task
    for folder, n in folders:
        if size + n > limit:
            out.append([])
            size = 0
            limit = min(first or per_task, per_task) if len(out) == 1 else per_task
        out[-1].append(folder)
        size += n
    return out


@dataclass
class Found:
    """One DICOM series (accepted or refused) or one unusable file, described without its headers."""

    folder: str  # the series folder (or the file, for an unusable file)
    uid: str = ""
    files: tuple[str, ...] = ()  # slice order (accepted series); every member (refused)
    header: dict[str, str] = field(default_factory=dict)  # HEADER_TAGS as text
    error: str = ""  # empty: accepted
    stack: str = ""  # the 3D stack chosen, when the series holds several

    @property
    def series_number(self) -> str:
        return self.header.get("SeriesNumber", "")


def scan_folders(folders: list[str], stack: str | None = None) -> list[tuple[str, list[Found]]]:
    """(folder, every series and every unusable file in it) for each of ``folders`` (each read on its own, not
    recursively; a folder may also be a single file). ``stack``: the 3D stack of series that hold several."""
    return [(folder, _scan_folder(folder, stack)) for folder in folders]


def _candidate_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return [folder]
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and not is_nifti(e.name) and not is_sidecar(e.name))


def _scan_folder(folder: str, stack: str | None = None) -> list[Found]:
    """The folder's own files read through the project's one DICOM reader (:func:`mrannotator.dicom.find_series`:
    its series rules, stacks and reasons). A folder that also has subfolders is read through a temporary view of
    its own files (symbolic links), so that no subfolder is read twice."""
    import tempfile

    from ..dicom import find_series

    if not os.path.isdir(folder):
        return _found(folder, find_series(folder, stack=stack), {})
    with os.scandir(folder) as it:
        nested = any(e.is_dir() for e in it)
    if not nested:
        return _found(folder, find_series(folder, stack=stack), {})
    with tempfile.TemporaryDirectory(prefix="mra-scan-") as view:
        real = {}
        for f in _candidate_files(folder):
            link = os.path.join(view, os.path.basename(f))
            os.symlink(f, link)
            real[link] = f
        return _found(folder, find_series(view, stack=stack), real)


def _found(folder: str, scan, real: dict[str, str]) -> list[Found]:
    """Found records of one folder's scan (``real`` maps a view's links back to the files)."""
    out = [Found(real.get(str(p), str(p)), error=why) for p, why in scan.skipped
           if not (is_nifti(Path(p).name) or is_sidecar(Path(p).name))]  # NIfTI: cases; sidecars: counted
    for s in scan.series:
        header = {k: _text(s.header, k) for k in HEADER_TAGS}
        out.append(Found(folder, s.uid, tuple(real.get(str(f), str(f)) for f in s.files), header, stack=s.stack))
    for r in scan.rejected:
        m = _DESCRIBED.match(r.description)
        header = {"SeriesNumber": m.group(1) if m else "", "SeriesDescription": m.group(2) if m else ""}
        out.append(Found(folder, r.series_uid, (), header, error=f"{r.description}: {r.reason}"))
    return out


def _text(ds, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    return "" if value is None else str(value).strip()


def relative_parts(path: str, root: str) -> list[str]:
    rel = os.path.relpath(path, root)
    return [] if rel == "." else list(Path(rel).parts)
