"""The probabilities and current label map of each image's last infer, for click correction (one per process).

The segment task fills it (:func:`remember`); the refinement tasks (lib/infers/refine.py) read it, so an
interaction costs no network pass. Size: ``MRANNOTATOR_PROBABILITY_CACHE_MB`` (default 512 MiB, LRU,
0 turns it off); see :mod:`mrannotator.probcache` for the memory per image.
"""

from __future__ import annotations

import os

import numpy as np

from mrannotator.probcache import ProbabilityCache

CACHE = ProbabilityCache()


def image_key(request) -> str:
    """The image id, with the file's size and modification time: a replaced image is a new key."""
    path = str(request.get("image"))
    try:
        st = os.stat(path)
        stamp = f"@{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = ""
    return str(request.get("image_id") or path) + stamp


def enabled() -> bool:
    return CACHE.max_bytes > 0


def remember(request, result, model_version: str) -> None:
    """Keep an infer's probabilities and labels for the corrections that follow."""
    if result.probabilities:
        CACHE.put(image_key(request), model_version, result.probabilities, np.asanyarray(result.labels.dataobj))
