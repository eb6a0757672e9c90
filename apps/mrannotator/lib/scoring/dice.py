"""Scoring: multi-class Dice between the served models' prediction and each final label.

Stored in the image info as ``mrannotator_dice``: the mean over the structures present in either
volume (restricted to the structures the served models label) and the Dice of each of them, with
the checkpoints that made the prediction. (MONAI Label's built-in Dice treats labels as binary.)
"""

from __future__ import annotations

import logging
import time

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.service import ModelService
from mrannotator.errors import InputError
from mrannotator.imageio import load_image

logger = logging.getLogger(__name__)

INFO_KEY = "mrannotator_dice"


def multiclass_dice(truth: np.ndarray, pred: np.ndarray, ids) -> dict[int, float]:
    """Dice per id over the ids present in either volume."""
    out = {}
    for i in ids:
        t, p = truth == i, pred == i
        n = int(t.sum()) + int(p.sum())
        if n:
            out[int(i)] = 2.0 * int((t & p).sum()) / n
    return out


class MultiClassDice(ScoringMethod):
    def __init__(self, service: ModelService):
        super().__init__("Multi-class Dice (per structure and mean) of the served models against the final labels")
        self.service = service

    def __call__(self, request, datastore: Datastore):
        result = {}
        names = {s.id: s.name for s in self.service.segmenter().structures}
        versions = {m.folder.dataset: m.describe()["version"] for m in self.service.served()}
        for image_id in datastore.get_labeled_images():
            label_path = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            try:
                truth = np.asanyarray(load_image(label_path).dataobj)
                pred = np.asanyarray(self.service.segment(datastore.get_image_uri(image_id)).labels.dataobj)
            except InputError as e:
                logger.warning(f"dice: skipping {image_id}: {e}")
                continue
            per = multiclass_dice(truth, pred, names)
            score = {
                "mean": round(float(np.mean(list(per.values()))), 4) if per else None,
                "per_structure": {names[i]: round(d, 4) for i, d in per.items()},
                "checkpoints": versions,
                "ts": int(time.time()),
            }
            datastore.update_image_info(image_id, {INFO_KEY: score})
            result[image_id] = score
        return result
