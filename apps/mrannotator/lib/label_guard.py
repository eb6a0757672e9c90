"""No mirrored label becomes final: the proposals kept at infer time and the check on every final label.

The server keeps the newest proposal it gave for each series (``CACHE/proposals/<image>.nii.gz``,
written crash-safe: temp file, fsync, rename). A final label, sent with ``save_label`` or found as a
SEG in the PACS (OHIF's own export), is compared with it as stored and reversed along the slice axis
(:mod:`mrannotator.mirror`; without a proposal, with the image's intensities):

- ``save_label``: a mirrored label is refused with 409 and the reason; nothing reaches the PACS;
- a SEG in the PACS: it is quarantined (``CACHE/quarantine.json``), left out of the labelled series
  (so out of training, scoring and strategies), its reason shown in the image's info
  (``label_quarantined``) and in the 409 of the request that found it; an earlier good SEG of the
  series, if any, is the final label again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock

from lib.datastore import read_volume
from mrannotator.errors import InputError
from mrannotator.imageio import save_nifti, write_atomic
from mrannotator.mirror import MirrorVerdict, check_mirrored

logger = logging.getLogger(__name__)

WHY = ("OHIF's SEG export writes the frames of series whose instance numbers increase along the slice "
       "normal in reverse order (OHIF #5038)")
WHAT_TO_DO = ("Save the correction with the MONAI Label panel's save label (save_label) instead, "
              "or check the label's left/right and head/feet before saving it again")


class LabelMirrored(HTTPException, InputError):
    """A label that is mirrored along the slice axis: 409 at the endpoints, an InputError for the trainer,
    scoring and strategies (which leave it out and say why)."""

    def __init__(self, message: str):
        super().__init__(status_code=409, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class LabelGuard:
    def __init__(self, root: str | Path):
        self._root = Path(root)
        self._proposals = self._root / "proposals"
        self._proposals.mkdir(parents=True, exist_ok=True)
        self._quarantine_path = self._root / "quarantine.json"

    # ------------------------------------------------------------ proposals
    def proposal_path(self, image_id: str) -> Path:
        return self._proposals / f"{image_id}.nii.gz"

    def record_proposal(self, image_id: str, result_file: str | Path) -> None:
        """Keep the infer result the server gave for ``image_id`` (its newest proposal)."""
        label = read_volume(result_file, f"proposal for {image_id!r}")
        data = np.asanyarray(label.dataobj).astype(np.uint8)
        save_nifti(nib.Nifti1Image(data, label.affine), self.proposal_path(image_id))

    def proposal(self, image_id: str, affine: np.ndarray, shape: tuple) -> np.ndarray | None:
        """The kept proposal when it lies on the label's grid, else None."""
        path = self.proposal_path(image_id)
        if not path.is_file():
            return None
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
        except (OSError, ValueError) as e:  # unreadable: decide without it, and say so
            logger.warning(f"proposal for {image_id} unreadable ({e}); checking against the image only")
            return None
        if data.shape[:3] != tuple(shape[:3]) or not np.allclose(img.affine, affine, atol=1e-3):
            logger.info(f"proposal for {image_id} is on another grid; checking against the image only")
            return None
        return data

    # ------------------------------------------------------------ the check
    def verdict(self, image_id: str, label: nib.Nifti1Image, image: nib.Nifti1Image | None) -> MirrorVerdict:
        data = np.asanyarray(label.dataobj)
        proposal = self.proposal(image_id, label.affine, data.shape)
        pixels = None
        if image is not None and image.shape[:3] == data.shape[:3]:
            pixels = np.asanyarray(image.dataobj)
        verdict = check_mirrored(data, proposal, pixels)
        logger.info(f"mirror check of the label for {image_id}: {verdict.describe()}")
        return verdict

    def refuse_if_mirrored(self, image_id: str, label: nib.Nifti1Image, image: nib.Nifti1Image | None) -> None:
        """save_label: 409 with the reason when the label is mirrored."""
        verdict = self.verdict(image_id, label, image)
        if verdict.mirrored:
            raise LabelMirrored(f"label for series {image_id} refused: it looks mirrored along the slice axis "
                                f"({verdict.describe()}). {WHY}. {WHAT_TO_DO}.")

    def screen_seg(self, image_id: str, seg_uid: str, label: nib.Nifti1Image,
                   image: nib.Nifti1Image | None) -> None:
        """A label SEG found in the PACS: quarantined (and LabelMirrored raised) when mirrored."""
        verdict = self.verdict(image_id, label, image)
        if not verdict.mirrored:
            return
        message = (f"label SEG {seg_uid} of series {image_id} is quarantined, not used as the final label: it "
                   f"looks mirrored along the slice axis ({verdict.describe()}). {WHY}. {WHAT_TO_DO}.")
        self._quarantine(seg_uid, {"image": image_id, "reason": message, "check": verdict.as_dict(),
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        logger.warning(message)
        raise LabelMirrored(message)

    # ------------------------------------------------------------ quarantine records
    def quarantined(self) -> dict[str, dict]:
        """SEG series uid -> record (image, reason, check, when)."""
        try:
            return json.loads(self._quarantine_path.read_text())
        except (OSError, ValueError):
            return {}

    def _quarantine(self, seg_uid: str, record: dict) -> None:
        with FileLock(str(self._quarantine_path) + ".lock"):  # train/scoring subprocesses check too
            data = self.quarantined()
            data[seg_uid] = record
            write_atomic(self._quarantine_path,
                         lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))

    def image_info(self, image_id: str) -> dict:
        """What the image's info shows: its quarantined SEGs and why."""
        found = [{"seg": uid, **r} for uid, r in self.quarantined().items() if r.get("image") == image_id]
        return {"label_quarantined": found} if found else {}


def keep_proposal(datastore, image_id: str, result_file: str | None) -> None:
    """After an infer on a datastore image: keep the result as the series' proposal (datastores with a
    guard). A proposal that cannot be kept costs the check its best evidence, not the infer its answer."""
    guard = getattr(datastore, "guard", None)
    if guard is None or not result_file or not Path(result_file).is_file():
        return
    try:
        guard.record_proposal(image_id, result_file)
    except (HTTPException, OSError, InputError) as e:
        logger.warning(f"proposal for {image_id} not kept: {getattr(e, 'detail', e)}")
