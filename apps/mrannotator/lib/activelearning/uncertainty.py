"""Uncertainty strategy: the unlabeled image on which the served models' softmax entropy is highest."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.handout import record_handout
from lib.service import ModelService, mean_entropy
from mrannotator.errors import InputError

logger = logging.getLogger(__name__)

INFO_KEY = "mrannotator_entropy"


class SoftmaxEntropy(Strategy):
    """Ranks unlabeled images by mean voxel softmax entropy; values are cached in the image info per
    (image file, served checkpoints), so only new images or new checkpoints cost a prediction."""

    def __init__(self, service: ModelService):
        super().__init__("Unlabeled image with the highest mean softmax entropy of the served models")
        self.service = service

    def entropy(self, datastore: Datastore, image_id: str) -> float | None:
        signature = getattr(datastore, "image_signature", lambda _: "")(image_id)  # file mtime and size

        def key(served) -> str:  # per image file and model version: a new version re-ranks, nothing else does
            return f"{signature}|{','.join(m.describe()['version'] for m in served)}"

        cached = datastore.get_image_info(image_id).get(INFO_KEY) or {}
        if cached.get("key") == key(self.service.served()):
            return cached.get("value")
        served = self.service.served()
        try:
            result, served, _ = self.service.segment_versioned(datastore.get_image_uri(image_id), probabilities=True)
            value, error = round(mean_entropy(self.service.segmenter(), result), 6), None
        except InputError as e:  # an unreadable image is skipped, and says why in its info
            value, error = None, str(e)
            logger.warning(f"uncertainty: skipping {image_id}: {e}")
        datastore.update_image_info(image_id, {INFO_KEY: {"key": key(served), "value": value, "error": error}})
        return value

    def __call__(self, request, datastore: Datastore):
        ranking = []
        for image_id in datastore.get_unlabeled_images():
            value = self.entropy(datastore, image_id)
            if value is not None:
                ranking.append({"id": image_id, "entropy": value})
        if not ranking:
            return None
        ranking.sort(key=lambda r: (-r["entropy"], r["id"]))
        record_handout(datastore, ranking[0]["id"], request.get("client_id"))
        return {"id": ranking[0]["id"], "entropy": ranking[0]["entropy"], "ranking": ranking}
