"""Probabilities of the last infer per (image id, model version), kept in memory for click correction.

    cache = ProbabilityCache(max_bytes=512 * 2**20)
    cache.put("case7", "demo@3f2a", segmentation.probabilities)   # catalogue id -> float32 map
    probs = cache.get("case7", "demo@3f2a")                        # catalogue id -> uint8 map, or None
    cache.set_labels("case7", "demo@3f2a", corrected)              # the label map the corrections build on

Maps are stored as uint8 (probability x 255, rounded): one byte per voxel per structure, a quarter of
float32, and finer than the refinement can see (it clips the model's log-odds to +-4, p 0.018..0.982).
With each entry the current label map (uint8) is kept, so that corrections of one structure build on
those of the others. Memory per cached image = voxels x (structures + 1) bytes (256x256x40 with the 8
abdominal structures of the demo model: 23.6 MB). Least recently used entries are dropped first once
``max_bytes`` is exceeded;
an entry larger than ``max_bytes`` is not kept. Thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

DEFAULT_MAX_BYTES = 512 * 2**20
ENV_MAX_BYTES = "MRANNOTATOR_PROBABILITY_CACHE_MB"  # size of the server's cache, in MiB (0 turns it off)


def quantise(p: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as uint8 x 255 (what :func:`mrannotator.refine.refine` accepts as is)."""
    if p.dtype == np.uint8:
        return p
    return np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)


class ProbabilityCache:
    """LRU cache of per-structure probability maps keyed by (image id, model version), bounded in bytes."""

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            mb = os.environ.get(ENV_MAX_BYTES, "")
            max_bytes = int(float(mb) * 2**20) if mb.strip() else DEFAULT_MAX_BYTES
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple[str, str], dict[int, np.ndarray]] = OrderedDict()
        self._labels: dict[tuple[str, str], np.ndarray] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, image_id: str, model_version: str, probabilities: dict[int, np.ndarray],
            labels: np.ndarray | None = None) -> bool:
        """Keep the maps (and the label map) of one image; returns False when they alone exceed the cache size."""
        maps = {int(k): quantise(np.asanyarray(v)) for k, v in probabilities.items()}
        shapes = {m.shape for m in maps.values()} | ({labels.shape} if labels is not None else set())
        if len(shapes) > 1:
            raise ValueError(f"probability maps and labels must all have one shape, got {sorted(shapes)}")
        size = sum(m.nbytes for m in maps.values()) + (labels.size if labels is not None else 0)
        key = (str(image_id), str(model_version))
        with self._lock:
            self._drop(key)
            if size > self.max_bytes:
                return False
            self._items[key] = maps
            if labels is not None:
                self._labels[key] = np.asarray(labels, np.uint8).copy()
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
        return True

    def get(self, image_id: str, model_version: str) -> dict[int, np.ndarray] | None:
        key = (str(image_id), str(model_version))
        with self._lock:
            maps = self._items.get(key)
            if maps is not None:
                self._items.move_to_end(key)
            return maps

    def labels(self, image_id: str, model_version: str) -> np.ndarray | None:
        """The current label map of a cached image (the infer's, then each correction's), or None."""
        with self._lock:
            return self._labels.get((str(image_id), str(model_version)))

    def set_labels(self, image_id: str, model_version: str, labels: np.ndarray) -> None:
        """Replace the current label map of a cached image (ignored when the image is no longer cached)."""
        key = (str(image_id), str(model_version))
        with self._lock:
            if key not in self._items:
                return
            old = self._labels.get(key)
            self._labels[key] = np.asarray(labels, np.uint8).copy()
            self._bytes += labels.size - (old.size if old is not None else 0)

    def forget(self, image_id: str) -> None:
        """Drop every model version's maps of one image (its image changed or was deleted)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == str(image_id)]:
                self._drop(key)

    def _drop(self, key) -> None:
        maps = self._items.pop(key, None)
        if maps is not None:
            self._bytes -= sum(m.nbytes for m in maps.values())
        labels = self._labels.pop(key, None)
        if labels is not None:
            self._bytes -= labels.size
