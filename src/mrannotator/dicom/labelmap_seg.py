"""Label Map Segmentation Storage (DICOM Sup 243, SOP class ...66.7) as OHIF 3.13 exports it.

OHIF 3.13.2's "Export > DICOM SEG" writes a LABELMAP SEG: one frame per painted slice, pixel values are
segment numbers, each frame with its PlanePositionSequence and the SOP instance it was derived from, but
no FrameContentSequence (required for a multi-frame image; highdicom refuses the file for it). Here each
frame is placed on the slice of the instance it references, and only when the frame's position is that
instance's position (so a frame whose content and reference disagree is refused, never placed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

POSITION_TOLERANCE_MM = 0.01


def _frame_items(seg: Dataset, n_frames: int) -> list[Dataset]:
    per_frame = list(seg.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame) != n_frames:
        raise ValueError(f"{len(per_frame)} per-frame functional groups for {n_frames} frames")
    return per_frame


def _source_uid(item: Dataset) -> str:
    for derivation in item.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            return str(source.ReferencedSOPInstanceUID)
    raise ValueError("a frame names no source image (DerivationImageSequence > SourceImageSequence)")


def labelmap_pixels(seg: Dataset, ordered: Sequence[Dataset], numbers: Sequence[int]) -> np.ndarray:
    """(instances, rows, columns, segments) as 0/1 float32, like highdicom's get_pixels_by_source_instance."""
    frames = seg.pixel_array
    frames = frames[None] if frames.ndim == 2 else frames
    slot = {str(ds.SOPInstanceUID): k for k, ds in enumerate(ordered)}
    out = np.zeros((len(ordered), int(seg.Rows), int(seg.Columns), len(numbers)), np.float32)
    for frame, item in zip(frames, _frame_items(seg, len(frames)), strict=True):
        uid = _source_uid(item)
        if uid not in slot:
            raise ValueError(f"a frame references instance {uid}, which is not in the series")
        source = ordered[slot[uid]]
        position = item.get("PlanePositionSequence") or seg.SharedFunctionalGroupsSequence[0].get(
            "PlanePositionSequence")
        if position is None:
            raise ValueError("a frame has no PlanePositionSequence")
        gap = np.abs(np.subtract([float(v) for v in position[0].ImagePositionPatient],
                                 [float(v) for v in source.ImagePositionPatient])).max()
        if gap > POSITION_TOLERANCE_MM:
            raise ValueError(f"a frame's position is {gap:.2f} mm from the instance {uid} it references")
        for j, number in enumerate(numbers):
            out[slot[uid], ..., j] = np.maximum(out[slot[uid], ..., j], frame == number)
    return out
