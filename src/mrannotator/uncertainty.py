"""Uncertainty of a segmentation from its softmax maps (the active-learning strategy ranks images by it)."""

from __future__ import annotations

import numpy as np


def mean_entropy(segmenter, result) -> float:
    """Mean voxel softmax entropy (normalised to 0-1 by log of the class count), averaged over the models run.

    Needs ``result`` made with ``probabilities=True``; each model's background is 1 - its foreground sum.
    """
    if result.probabilities is None:
        raise ValueError("mean_entropy needs a segmentation made with probabilities=True")
    values = []
    for m in segmenter.models:
        if m.dataset not in result.models_run:
            continue
        ids = [s.id for s in m.structures.values() if s.id in result.probabilities]
        if not ids:
            continue
        fg = np.stack([result.probabilities[i] for i in ids]).astype(np.float32)
        p = np.concatenate([np.clip(1.0 - fg.sum(0, keepdims=True), 0.0, 1.0), fg])
        h = -(p * np.log(np.clip(p, 1e-8, 1.0))).sum(0) / np.log(len(ids) + 1)
        values.append(float(h.mean()))
    return float(np.mean(values)) if values else 0.0
