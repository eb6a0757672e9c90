"""Label maps exchanged with the browser as DICOM frames (``/annotate/*``, lib/monailabel_adapter/annotate.py).

The browser (OHIF, cornerstone) holds a labelmap as one slice per source instance, each slice in that
instance's own pixel order (Rows x Columns, row-major), keyed by its SOPInstanceUID. The server's image
for a series is the project's DICOM reader's volume (:func:`mrannotator.dicom.load_series`): voxel
``[i, j, k]`` is column ``i``, row ``j`` of the ``k``-th instance of ``series.datasets`` (slice order).
So a frame maps to a slice by its instance's UID alone: no positions, orientations or slice order are
trusted from the browser, and a frame cannot land on another slice or mirrored in the plane.

On the wire a frame is ``base64(zlib(uint8 Rows*Columns bytes))``; frames that are all 0 may be left out.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from mrannotator.errors import InputError

MAX_FRAME_BYTES = 4096 * 4096  # one frame's decompressed bytes


def encode_frame(frame: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(frame, np.uint8).tobytes(), 6)).decode("ascii")


def decode_frame(text: object, rows: int, columns: int, uid: str) -> np.ndarray:
    """One frame (rows, columns) from its wire form; InputError naming the instance when it is not one."""
    if not isinstance(text, str):
        raise InputError(f"frame of instance {uid}: expected a base64 string, got {type(text).__name__}")
    try:
        packed = base64.b64decode(text, validate=True)
        raw = zlib.decompressobj().decompress(packed, MAX_FRAME_BYTES + 1)
    except (binascii.Error, ValueError, zlib.error) as e:
        raise InputError(f"frame of instance {uid} is not base64 of zlib data: {e}") from e
    if len(raw) != rows * columns:
        raise InputError(f"frame of instance {uid} has {len(raw)} pixels; the instance has {rows} x {columns} = "
                         f"{rows * columns}")
    return np.frombuffer(raw, np.uint8).reshape(rows, columns)


def frames_from_volume(volume: np.ndarray, uids: Sequence[str]) -> dict[str, str]:
    """The non-empty slices of ``volume`` (column, row, slice) as wire frames keyed by instance UID."""
    if volume.ndim != 3 or volume.shape[2] != len(uids):
        raise InputError(f"label of shape {volume.shape} does not match a series of {len(uids)} instances")
    if volume.size and (volume.min() < 0 or volume.max() > 255):
        raise InputError("label values must lie in 0..255 to travel as 8-bit frames")
    return {uid: encode_frame(volume[:, :, k].T) for k, uid in enumerate(uids) if volume[:, :, k].any()}


def volume_from_frames(frames: Mapping[str, object], uids: Sequence[str], rows: int, columns: int) -> np.ndarray:
    """The label volume (column, row, slice) on the series' grid from wire frames keyed by instance UID."""
    if not isinstance(frames, Mapping):
        raise InputError(f"frames must be an object of SOPInstanceUID -> frame, not {type(frames).__name__}")
    index = {uid: k for k, uid in enumerate(uids)}
    unknown = [uid for uid in frames if uid not in index]
    if unknown:
        raise InputError(f"{len(unknown)} frame(s) name instances that are not in this series (first: "
                         f"{str(unknown[0])[:80]!r}): was another series open in the viewer?")
    volume = np.zeros((columns, rows, len(uids)), np.uint8)
    for uid, text in frames.items():
        volume[:, :, index[uid]] = decode_frame(text, rows, columns, uid).T
    return volume


def relabel(volume: np.ndarray, segments: Mapping[str, int]) -> np.ndarray:
    """Browser segment indices -> label ids (``segments``: index as text -> id); unknown index: InputError."""
    out = np.zeros(volume.shape, np.uint16)
    present = [int(v) for v in np.unique(volume) if v]
    missing = [v for v in present if str(v) not in segments]
    if missing:
        raise InputError(f"the label has voxels of segment(s) {missing} that the request does not name")
    for value in present:
        out[volume == value] = segments[str(value)]
    return out
