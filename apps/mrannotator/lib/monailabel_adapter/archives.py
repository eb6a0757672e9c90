"""Archives unpacked safely: the one unpacker every upload route uses (fix 10 of the package docstring).

Upstream: ``monailabel.utils.sessions.Sessions.add_session`` (``PUT /session/?uncompress=true``) calls
``shutil.unpack_archive`` on the upload. On Python 3.11 that applies no member filter: a tar member named
``../../x`` or ``/abs/path`` is written where it points, a symlink member points anywhere, and nothing bounds
the unpacked size (a 1 MB tar.gz unpacked to 1 GiB). No other MONAI Label 0.8.5 server route unpacks
(the CVAT and XNAT datastores do, but this app serves neither).

Here (:func:`unpack`): only regular files and folders, each named relatively inside the target (no absolute
name, no ``..``, no backslash, no NUL, no name over 255 bytes); symlinks, hardlinks, devices, FIFOs and
sparse members are refused. Caps, checked while unpacking (streaming: bytes are counted as they are
written, whatever the archive's headers claim): members, total unpacked bytes, and the ratio of unpacked
bytes to the archive's size (once past a small allowance, so a small, very compressible upload passes).
Everything is written into a fresh staging folder that is removed when the archive is refused, so a
refused archive leaves nothing behind. Refusals are :class:`ArchiveRefused` with the HTTP status to answer:
413 for a cap (size, ratio, members), 422 for a hostile or unreadable archive.

Caps (environment): ``MRANNOTATOR_ARCHIVE_MAX_MEMBERS`` (10,000: a DICOM series of a few thousand slices),
``MRANNOTATOR_ARCHIVE_MAX_BYTES`` (``MRANNOTATOR_MAX_BYTES``, 1 GiB: the largest image this installation
accepts), ``MRANNOTATOR_ARCHIVE_MAX_RATIO`` (100; DICOM and NIfTI compress 2-10x), checked once more than
``MRANNOTATOR_ARCHIVE_RATIO_ALLOWANCE`` bytes (16 MiB) are unpacked.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mrannotator.limits import Limits, positive_env_int

CHUNK = 1 << 20


class ArchiveRefused(Exception):
    """An archive this server will not unpack; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 10_000
    max_bytes: int = 2**30
    max_ratio: float = 100.0
    ratio_allowance: int = 16 * 2**20

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        return cls(max_members=positive_env_int("MRANNOTATOR_ARCHIVE_MAX_MEMBERS", cls.max_members),
                   max_bytes=positive_env_int("MRANNOTATOR_ARCHIVE_MAX_BYTES", Limits.from_env().max_bytes),
                   max_ratio=float(positive_env_int("MRANNOTATOR_ARCHIVE_MAX_RATIO", int(cls.max_ratio))),
                   ratio_allowance=positive_env_int("MRANNOTATOR_ARCHIVE_RATIO_ALLOWANCE", cls.ratio_allowance))


def check_member_name(name: str) -> tuple[str, ...]:
    """The member's path parts; :class:`ArchiveRefused` (422) for a name that could leave the target."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    if not name or "\0" in name or "\\" in name:
        raise ArchiveRefused(422, f"archive member {shown!r}: empty name, NUL or backslash in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveRefused(422, f"archive member {shown!r} has an absolute name; only names inside the "
                                  "archive's folder are unpacked")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveRefused(422, f"archive member {shown!r} names a path outside the archive's folder ('..')")
    if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise ArchiveRefused(422, f"archive member {shown!r} has a name part over 255 bytes")
    return parts


@dataclass
class _Budget:
    limits: ArchiveLimits
    archive_bytes: int
    members: int = 0
    written: int = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveRefused(413, f"the archive has more than {self.limits.max_members:,} members "
                                      "(MRANNOTATOR_ARCHIVE_MAX_MEMBERS)")

    def add(self, n: int) -> None:
        self.written += n
        if self.written > self.limits.max_bytes:
            raise ArchiveRefused(413, f"the archive unpacks to more than {self.limits.max_bytes:,} bytes "
                                      "(MRANNOTATOR_ARCHIVE_MAX_BYTES)")
        ratio = self.written / max(self.archive_bytes, 1)
        if self.written > self.limits.ratio_allowance and ratio > self.limits.max_ratio:
            raise ArchiveRefused(413, f"the archive unpacks to more than {self.limits.max_ratio:g} times its size "
                                      f"({self.archive_bytes:,} bytes; MRANNOTATOR_ARCHIVE_MAX_RATIO): "
                                      "refused as a decompression bomb")


def archive_kind(path: str | Path) -> str | None:
    """``"zip"`` or ``"tar"`` (any compression tarfile reads) from the content, not the name; else None."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, EOFError, tarfile.TarError):
        return None


def unpack(archive: str | Path, target: str | Path, limits: ArchiveLimits | None = None) -> int:
    """Unpack ``archive`` (zip or tar) into ``target``, a folder that must not exist yet; returns the member
    count. On any refusal or error ``target`` is removed and :class:`ArchiveRefused` raised."""
    archive, target = Path(archive), Path(target)
    limits = limits or ArchiveLimits.from_env()
    budget = _Budget(limits, archive.stat().st_size)
    kind = archive_kind(archive)
    if kind is None:
        raise ArchiveRefused(422, "the upload is not a zip or tar archive (uncompress=true needs one)")
    target.mkdir(parents=False, exist_ok=False)
    try:
        entries = _zip_entries(archive, budget) if kind == "zip" else _tar_entries(archive, budget)
        for parts, source in entries:
            _write(target, parts, source, budget)
    except ArchiveRefused:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, RuntimeError, ValueError) as e:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveRefused(422, f"the archive cannot be unpacked: {type(e).__name__}: {e}") from None
    return budget.members


def _write(target: Path, parts: tuple[str, ...], source: IO[bytes] | None, budget: _Budget) -> None:
    if not parts:
        return
    path = target.joinpath(*parts)
    for parent in reversed(path.parents):  # every folder on the way is a real folder inside the target
        if parent.is_relative_to(target) and parent != target and (parent.is_symlink() or
                                                                      (parent.exists() and not parent.is_dir())):
            raise ArchiveRefused(422, f"archive member {'/'.join(parts)!r} goes through a file of the same archive")
    if source is None:
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_dir():
        raise ArchiveRefused(422, f"archive member {'/'.join(parts)!r} names a folder of the same archive")
    with source, open(path, "wb") as out:
        while chunk := source.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)


def _zip_entries(archive: Path, budget: _Budget) -> Iterator[tuple[tuple[str, ...], IO[bytes] | None]]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > budget.limits.max_members:  # the central directory lists them all: refuse up front
            budget.members = len(infos) - 1
            budget.member()
        for info in infos:
            budget.member()
            parts = check_member_name(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (DOS, zipfile's own writes)
            if info.is_dir():
                yield parts, None
            elif kind and kind != stat.S_IFREG:
                raise ArchiveRefused(422, f"archive member {info.filename!r} is not a regular file or folder "
                                          "(a link or a device): refused")
            else:
                yield parts, zf.open(info)


def _tar_entries(archive: Path, budget: _Budget) -> Iterator[tuple[tuple[str, ...], IO[bytes] | None]]:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:  # headers are read one by one as the stream goes: caps hold while unpacking
            budget.member()
            parts = check_member_name(member.name)
            if member.isdir():
                yield parts, None
            elif member.isreg() and not member.issparse():
                yield parts, tf.extractfile(member)
            else:
                what = "a symlink" if member.issym() else "a hardlink" if member.islnk() else "not a regular file"
                raise ArchiveRefused(422, f"archive member {member.name!r} is {what}: only regular files and "
                                          "folders are unpacked")
