"""Size caps for images and labels, checked from the file header before any voxel is decompressed.

A gzip NIfTI of a billion zero voxels is a few hundred kilobytes; a 370-byte NIfTI can declare
2 GB of voxels. Both are refused here from what the header declares, so a reader never allocates
for them:

- declared voxels and declared voxel bytes against the caps (:class:`TooLargeError`, HTTP 413);
- declared bytes against what the file can hold: an uncompressed file must hold them, and deflate
  cannot expand data more than ~1032:1, so a gzip file cannot hold more than that (:class:`InputError`,
  HTTP 422);
- gzip data is then decompressed with a budget of the declared size (never more), so a stream that
  holds more than its header says, or is corrupt or truncated, is refused as well.

Caps: ``MRANNOTATOR_MAX_VOXELS`` (default 2^28 = 268,435,456: 512x512x1024, above any clinical MR
volume) and ``MRANNOTATOR_MAX_BYTES`` (default 1 GiB: the voxel data as stored, and the file size);
the MONAI Label app sets them from ``--conf max_voxels`` / ``--conf max_bytes`` (:func:`configure`).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from nibabel.wrapstruct import WrapStructError

from .errors import InputError

DEFAULT_MAX_VOXELS = 2**28
DEFAULT_MAX_BYTES = 2**30
# deflate's largest expansion is 1032:1 (RFC 1951 limits); the gzip header and trailer add 18 bytes
MAX_DEFLATE_RATIO = 1032
_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1 needs 348


class TooLargeError(InputError):
    """The image or label declares more voxels or bytes than this installation accepts (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls) -> Limits:
        return cls(max_voxels=positive_env_int("MRANNOTATOR_MAX_VOXELS", DEFAULT_MAX_VOXELS),
                   max_bytes=positive_env_int("MRANNOTATOR_MAX_BYTES", DEFAULT_MAX_BYTES))


def positive_env_int(name: str, default: int) -> int:
    """A positive whole number from the environment variable ``name``; ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: must be at least 1")
    return value


_configured: Limits | None = None


def configure(limits: Limits | None) -> None:
    """Set the caps for this process (None: back to the environment / defaults)."""
    global _configured
    _configured = limits


def current() -> Limits:
    return _configured if _configured is not None else Limits.from_env()


@dataclass(frozen=True)
class Declared:
    """What a file's header says it holds."""

    shape: tuple[int, ...]
    itemsize: int
    data_offset: int
    compressed: bool

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.itemsize


def check_declared(shape, itemsize: int, what: str, limits: Limits | None = None) -> None:
    """Refuse a volume whose declared size is over the caps (before anything is allocated)."""
    limits = limits or current()
    voxels = math.prod(int(n) for n in shape)
    if voxels > limits.max_voxels:
        dims = "x".join(str(int(n)) for n in shape)
        raise TooLargeError(f"{what} declares {dims} = {voxels:,} voxels; the limit is {limits.max_voxels:,} "
                            "(MRANNOTATOR_MAX_VOXELS / --conf max_voxels)")
    if voxels * itemsize > limits.max_bytes:
        raise TooLargeError(f"{what} declares {voxels * itemsize:,} bytes of voxel data; the limit is "
                            f"{limits.max_bytes:,} (MRANNOTATOR_MAX_BYTES / --conf max_bytes)")


def _check_file_size(path: Path, what: str, limits: Limits) -> int:
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise TooLargeError(f"{what} is {size:,} bytes; the limit is {limits.max_bytes:,} "
                            "(MRANNOTATOR_MAX_BYTES / --conf max_bytes)")
    return size


def nifti_declared(path: str | Path, what: str | None = None) -> Declared:
    """The NIfTI-1/2 header of ``path`` (plain or gzip), read from its first bytes only."""
    path = Path(path)
    what = what or str(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read {what}: corrupt or truncated gzip data ({e})") from e
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            header = cls.from_fileobj(io.BytesIO(head), check=True)
            shape = tuple(int(n) for n in header.get_data_shape())
            itemsize = header.get_data_dtype().itemsize
            offset = int(header.get_data_offset())
            break
        except (nib.spatialimages.HeaderDataError, nib.filebasedimages.ImageFileError, WrapStructError, ValueError,
                TypeError, KeyError, EOFError):  # WrapStructError: fewer bytes than a header (an empty file)
            continue
    else:
        raise InputError(f"cannot read {what}: not a NIfTI image (no valid NIfTI-1/2 header)")
    if any(n < 0 for n in shape):
        raise InputError(f"cannot read {what}: the header declares a negative dimension {shape}")
    return Declared(shape=shape, itemsize=itemsize, data_offset=offset, compressed=compressed)


def check_nifti_file(path: str | Path, what: str | None = None, limits: Limits | None = None) -> Declared:
    """The header's declared size against the caps and against what the file can hold; reads the header only."""
    path = Path(path)
    what = what or str(path)
    limits = limits or current()
    size = _check_file_size(path, what, limits)
    declared = nifti_declared(path, what)
    check_declared(declared.shape, declared.itemsize, what, limits)
    needed = declared.data_offset + declared.data_bytes
    if not declared.compressed and size < needed:
        raise InputError(f"cannot read {what}: the header declares {declared.data_bytes:,} bytes of voxel data "
                         f"but the file holds only {max(0, size - declared.data_offset):,} "
                         "(truncated file or forged header)")
    if declared.compressed and needed > MAX_DEFLATE_RATIO * size:
        raise InputError(f"cannot read {what}: the header declares {declared.data_bytes:,} bytes of voxel data, "
                         f"more than a {size:,}-byte gzip file can hold (forged header)")
    return declared


def read_nifti_bytes(path: str | Path, what: str | None = None, limits: Limits | None = None) -> bytes:
    """The whole (decompressed) NIfTI file, after :func:`check_nifti_file`; gzip data is decompressed with a
    budget of what the header declares, and a stream that is corrupt, truncated or longer is refused."""
    path = Path(path)
    what = what or str(path)
    declared = check_nifti_file(path, what, limits)
    if not declared.compressed:
        return path.read_bytes()
    budget = declared.data_offset + declared.data_bytes
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(budget)
            if f.read(1):
                raise InputError(f"cannot read {what}: the gzip data holds more than the {budget:,} bytes its "
                                 "header declares")
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
        raise InputError(f"cannot read {what}: corrupt or truncated gzip data ({e})") from e
    return raw


def check_image_file(path: str | Path, what: str | None = None, limits: Limits | None = None) -> Declared:
    """Header check for any file the server accepts: NIfTI (own reader) or NRRD/MHA (SimpleITK's header reader)."""
    path = Path(path)
    what = what or str(path)
    if path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return _check_sitk_file(path, what, limits or current())
    return check_nifti_file(path, what, limits)


def _check_sitk_file(path: Path, what: str, limits: Limits) -> Declared:
    import SimpleITK as sitk

    _check_file_size(path, what, limits)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"cannot read {what}: {str(e).strip().splitlines()[-1]}") from e
    shape = tuple(int(n) for n in reader.GetSize())
    components = reader.GetNumberOfComponents()
    itemsize = sitk.Image([1] * len(shape), reader.GetPixelID(), components).GetSizeOfPixelComponent() * components
    check_declared(shape, itemsize, what, limits)
    return Declared(shape=shape, itemsize=itemsize, data_offset=0, compressed=False)
