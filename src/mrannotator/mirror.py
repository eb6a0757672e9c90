"""Is a label mirrored along the slice axis? The check the server runs on every final label.

OHIF's SEG export (the dcmjs path of the bundle MONAI Label 0.8.5 ships; OHIF #5038, #5183) writes
the pixel frames in reverse slice order on series whose instance numbers increase along the slice
normal, while every frame's position and ReferencedSOPInstanceUID stay right. Nothing in the file
shows it, so the check looks at the content:

- **against the proposal** the server gave for the series (kept at infer time): an honest correction
  edits part of the proposal, so it is closer to the proposal as stored than to the proposal reversed
  along the slice axis. A label far closer to the reversed proposal (``reversed <= RATIO * as_is``
  and ``as_is - reversed >= MIN_GAP``) is mirrored. A proposal that looks the same reversed
  (``asymmetry < MIN_ASYMMETRY``, e.g. empty or symmetric with the same label values) decides
  nothing.
- **against the image** (no proposal, or an undecided one): the label's structures should explain the
  intensities of the voxels they cover (correlation ratio eta^2 of intensity by structure) better as
  stored than reversed.
  Only a clear gap (``IMAGE_MARGIN``) counts, so labels that do not follow intensities (painted blobs,
  symmetric anatomy) decide nothing.

Distances are multi-label: the share of the voxels labelled in either volume whose label differs
(0 = the same label everywhere, 1 = nowhere the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SLICE_AXIS = 2  # the grid of a series: slice k = k-th instance along the slice normal
RATIO = 0.5
MIN_GAP = 0.1
MIN_ASYMMETRY = 0.1
IMAGE_MARGIN = 0.15


@dataclass(frozen=True)
class MirrorVerdict:
    mirrored: bool | None  # None: this evidence cannot tell
    basis: str  # "proposal", "image" or "none"
    as_is: float | None = None  # distance (proposal) or fit (image) of the label as stored
    reversed: float | None = None  # the same for the label reversed along the slice axis
    asymmetry: float | None = None  # proposal vs itself reversed (how much reversal shows)

    def describe(self) -> str:
        if self.basis == "proposal":
            return (f"{self.as_is:.0%} of labelled voxels differ from the model's proposal as stored, "
                    f"{self.reversed:.0%} from the proposal reversed along the slice axis")
        if self.basis == "image":
            return (f"the label explains the image intensities to eta2 = {self.as_is:.2f} as stored and "
                    f"{self.reversed:.2f} reversed along the slice axis")
        return "no proposal for this series and no image evidence: not checked for mirroring"

    def as_dict(self) -> dict:
        return asdict(self)


def label_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the voxels labelled in ``a`` or ``b`` whose label differs (0 when both are empty)."""
    union = (a > 0) | (b > 0)
    n = int(np.count_nonzero(union))
    if n == 0:
        return 0.0
    return float(np.count_nonzero((a != b) & union)) / n


def _same_grid(label: np.ndarray, other: np.ndarray, what: str) -> None:
    if label.shape[:3] != other.shape[:3]:
        raise ValueError(f"the label {label.shape} and the {what} {other.shape} are not on one grid")


def against_proposal(label: np.ndarray, proposal: np.ndarray, axis: int = SLICE_AXIS) -> MirrorVerdict:
    """The label vs the server's proposal for the series, as stored and reversed along ``axis``."""
    _same_grid(label, proposal, "proposal")
    flipped = np.flip(proposal, axis)
    asymmetry = label_distance(proposal, flipped)
    as_is, rev = label_distance(label, proposal), label_distance(label, flipped)
    if asymmetry < MIN_ASYMMETRY:
        mirrored = None
    else:
        mirrored = bool(rev <= RATIO * as_is and as_is - rev >= MIN_GAP)
    return MirrorVerdict(mirrored, "proposal", round(as_is, 4), round(rev, 4), round(asymmetry, 4))


def intensity_fit(image: np.ndarray, label: np.ndarray) -> float:
    """Correlation ratio eta^2 over the labelled voxels: the share of their intensity variance that the
    label's structures explain (1: each structure is uniform; 0: the structures are no different)."""
    inside = np.asarray(label) > 0
    values = np.asarray(image, np.float64)[inside]
    classes = np.asarray(label)[inside].astype(np.int64)
    if values.size == 0:
        return 0.0
    total = float(((values - values.mean()) ** 2).sum())
    if total == 0.0:
        return 0.0
    counts = np.bincount(classes)
    sums = np.bincount(classes, weights=values)
    present = counts > 0
    means = sums[present] / counts[present]
    between = float((counts[present] * (means - values.mean()) ** 2).sum())
    return between / total


def against_image(label: np.ndarray, image: np.ndarray, axis: int = SLICE_AXIS) -> MirrorVerdict:
    """The label's fit to the image intensities as stored vs reversed along ``axis``."""
    _same_grid(label, image, "image")
    as_is = intensity_fit(image, label)
    rev = intensity_fit(image, np.flip(label, axis))
    mirrored = True if rev - as_is >= IMAGE_MARGIN else None
    return MirrorVerdict(mirrored, "image", round(as_is, 4), round(rev, 4))


def check_mirrored(label: np.ndarray, proposal: np.ndarray | None = None,
                   image: np.ndarray | None = None, axis: int = SLICE_AXIS) -> MirrorVerdict:
    """The proposal decides when it can; otherwise the image. An undecided verdict keeps the figures of the
    last evidence looked at (basis "none" when there was none)."""
    label = np.asarray(label)
    verdict = MirrorVerdict(None, "none")
    if proposal is not None:
        verdict = against_proposal(label, np.asarray(proposal), axis)
        if verdict.mirrored is not None:
            return verdict
    if image is not None and np.any(label):
        verdict = against_image(label, np.asarray(image), axis)
    return verdict
