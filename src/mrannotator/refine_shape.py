"""How far one click reaches, per kind of structure: tubes (vessels, oesophagus) versus organs.

Measured on the click bench (bench/README.md, "Click correction"): a vessel's neighbours often have nearly
its signal (hard_t1: the aorta 2 noise SDs darker than the fat around it; real MR: the aorta and IVC both
dark, side by side), so the intensity tolerance of an organ click (SIMILAR_NOISE of :mod:`mrannotator.refine`,
4.5 noise SDs) lets one vessel click claim 2-3x the vessel's cross-section, and the background clicks that
follow cut whole slices of it away again. A tube is also long along the body and thin across it, so a click's
Euclidean reach (30 mm) covered 4-10 of its 20-30 slices. For a tubular structure a click therefore looks for
voxels within TUBE_SIMILAR_NOISE noise SDs of its own signal and its distances along the body's long axis count
TUBE_STRETCH times less (its reach runs along the tube). Organs keep the original behaviour: the tighter
tolerance measured worse on them (liver, gallbladder, spleen need more clicks at 1.5 SDs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TUBULAR = ("aorta", "inferior_vena_cava", "esophagus")  # catalogue names
TUBE_SIMILAR_NOISE = 1.5  # noise SDs (1.0: fragments; 2.0: leaks into neighbours of similar signal)
TUBE_STRETCH = 2.0  # distances along the long axis count this many times less (3: within noise of 2; 4: overshoots)


@dataclass(frozen=True)
class ClickProfile:
    similar_noise: float  # intensity tolerance of a click's connected similar region, in noise SDs
    stretch: tuple[float, float, float]  # per voxel axis: mm distances are divided by this

    def distance_spacing(self, spacing) -> np.ndarray:
        """The voxel spacing (mm) to measure a click's reach with."""
        return np.asarray(spacing, np.float32) / np.asarray(self.stretch, np.float32)


def tubular_ids() -> frozenset[int]:
    from .catalogue import load_catalogue

    cat = load_catalogue()
    return frozenset(s.id for s in cat.structures if s.name in TUBULAR)


def click_profile(label_id: int, organ_similar_noise: float, long_axis: int | None, spacing) -> ClickProfile:
    """The profile of structure ``label_id`` (a catalogue id); ``long_axis`` is the voxel axis along the body
    (None: the axis with the coarsest spacing, the slice axis of an axial series; the last one on ties)."""
    if label_id not in tubular_ids():
        return ClickProfile(organ_similar_noise, (1.0, 1.0, 1.0))
    axis = default_long_axis(spacing) if long_axis is None else int(long_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"long_axis must be 0, 1 or 2, got {long_axis!r}")
    stretch = [1.0, 1.0, 1.0]
    stretch[axis] = TUBE_STRETCH
    return ClickProfile(TUBE_SIMILAR_NOISE, tuple(stretch))


def default_long_axis(spacing) -> int:
    sp = list(spacing)
    return max(range(3), key=lambda a: (sp[a], a))


def long_axis_of(affine) -> int:
    """The voxel axis of ``affine`` closest to the patient's superior-inferior direction."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine))
    return next(i for i, c in enumerate(codes) if c in ("S", "I"))
