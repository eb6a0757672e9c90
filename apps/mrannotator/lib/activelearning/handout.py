"""Strategies that never fail when every image was just handed out, and do not give two annotators one image.

The active-learning endpoint records each hand-out in the image info (``strategy: {name: {ts,
client_id}}``); these strategies read that record back (it is persisted in the datastore file).
"""

from __future__ import annotations

import logging
import random
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


HANDOUT_KEY = "mrannotator_handout"


def last_handout(datastore: Datastore, image_id: str) -> tuple[float, str | None]:
    """(time, client) of the latest hand-out of ``image_id``; (0, None) if never.

    Our strategies record it themselves with sub-second time; the endpoint's own record (whole
    seconds, one per strategy) is the fallback for hand-outs made by other strategies.
    """
    info = datastore.get_image_info(image_id)
    records = list((info.get("strategy") or {}).values())
    if info.get(HANDOUT_KEY):
        records.append(info[HANDOUT_KEY])
    latest = max(records, key=lambda r: float(r.get("ts", 0)), default={})
    return float(latest.get("ts", 0)), latest.get("client_id")


def record_handout(datastore: Datastore, image_id: str, client: str | None) -> dict:
    datastore.update_image_info(image_id, {HANDOUT_KEY: {"ts": time.time(), "client_id": client}})
    return {"id": image_id}


def free_for(datastore: Datastore, images: list[str], client: str | None, reserve_seconds: int) -> list[str]:
    """Images not handed out to another client within ``reserve_seconds``."""
    now = time.time()
    out = []
    for image in images:
        ts, who = last_handout(datastore, image)
        if now - ts >= reserve_seconds or (client is not None and who == client):
            out.append(image)
    return out


class RandomStrategy(Strategy):
    """A random unlabeled image; images handed out long ago are likelier, recent ones still possible."""

    def __init__(self, reserve_seconds: int = 600):
        super().__init__("Random unlabeled image (weighted towards images not handed out recently)")
        self.reserve_seconds = reserve_seconds

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        now = time.time()
        # weight = seconds since the last hand-out, plus one: never all zero (the built-in Random's 500)
        weights = [max(0.0, now - last_handout(datastore, i)[0]) + 1.0 for i in images]
        image = random.choices(images, weights=weights)[0]
        return record_handout(datastore, image, request.get("client_id"))


class FirstStrategy(Strategy):
    """The first unlabeled image (by id) that no other annotator was just given."""

    def __init__(self, reserve_seconds: int = 600):
        super().__init__("First unlabeled image by id, skipping images handed out to another annotator")
        self.reserve_seconds = reserve_seconds

    def __call__(self, request, datastore: Datastore):
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        client = request.get("client_id")
        free = free_for(datastore, images, client, self.reserve_seconds)
        if free:
            return record_handout(datastore, free[0], client)

        # everything is reserved: the one handed out longest ago (hand-out times are whole seconds, so
        # on a tie prefer an image not last given to another named annotator)
        def age(image):
            ts, who = last_handout(datastore, image)
            return ts, who is not None and who != client

        return record_handout(datastore, min(images, key=age), client)
