"""Listing a folder tree of DICOM files without ever stopping early.

GDCM's directory scan stops at the first dangling symlink or symlink loop and returns a shorter
series without an error. Here every entry is looked at on its own: dangling symlinks, symlink loops
(a link to itself, or a folder link back to a folder already listed), unreadable entries and second
paths to a file already listed are skipped with the reason, and the listing goes on. A DICOMDIR given
as the input is followed: the files its records reference, those missing skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

Skipped = tuple[Path, str]
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def is_dicomdir(path: Path) -> bool:
    """``path`` is a DICOMDIR (Media Storage Directory), judged by its file meta information."""
    from pydicom.filereader import read_file_meta_info

    try:
        return read_file_meta_info(path).get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY
    except Exception:  # not DICOM, or no file meta: not a DICOMDIR
        return False


def dicomdir_files(path: Path) -> tuple[list[Path], list[Skipped]]:
    """(the files a DICOMDIR's records reference that exist, (path, reason) of those that do not), in record order.

    Read from its Directory Record Sequence (ReferencedFileID, relative to the DICOMDIR's folder): pydicom's
    FileSet drops a record whose file is missing with only a warning, and a missing file must be named.
    """
    import pydicom

    try:
        records = pydicom.dcmread(path).DirectoryRecordSequence
    except Exception as e:  # a damaged DICOMDIR: named, nothing listed
        return [], [(path, f"unreadable DICOMDIR ({type(e).__name__}: {e})")]
    files, skipped = [], []
    for record in records:
        parts = record.get("ReferencedFileID")
        if not parts:
            continue  # a patient, study or series record
        file = path.parent.joinpath(*([parts] if isinstance(parts, str) else list(parts)))
        if file.is_file():
            files.append(file)
        else:
            skipped.append((file, "listed in the DICOMDIR, not found"))
    return files, skipped


def _entry_problem(path: Path, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if path.is_symlink():
        return f"dangling symlink (to {os.readlink(path)})"
    return f"unreadable ({err.strerror or err})"


def _sorted_entries(folder: Path, skipped: list[Skipped]) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it)
    except OSError as e:
        skipped.append((folder, f"unreadable folder ({e.strerror or e})"))
        return []


def list_files(root: Path) -> tuple[list[Path], list[Skipped]]:
    """(regular files under ``root`` in path order, (path, reason) of every entry skipped).

    Symlinks are followed; a file reached twice (through a link) is listed once.
    """
    root = Path(root)
    skipped: list[Skipped] = []
    st = root.stat()
    if not stat.S_ISDIR(st.st_mode):
        return dicomdir_files(root) if is_dicomdir(root) else ([root], skipped)
    files: list[Path] = []
    seen_dirs = {(st.st_dev, st.st_ino)}
    seen_files: dict[tuple[int, int], Path] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        subfolders = []
        for path in _sorted_entries(folder, skipped):
            try:
                st = path.stat()
            except OSError as e:
                skipped.append((path, _entry_problem(path, e)))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if key in seen_dirs:
                    skipped.append((path, "symlink loop (a folder already listed)"))
                else:
                    seen_dirs.add(key)
                    subfolders.append(path)
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((path, "not a regular file"))
            elif key in seen_files:
                skipped.append((path, f"same file as {seen_files[key]}"))
            else:
                seen_files[key] = path
                files.append(path)
        pending.extend(reversed(subfolders))  # depth first, in path order
    return files, skipped
