"""MRAnnotator: MRI multi-structure segmentation with nnU-Net v2 (engine, MONAI Label app, MONAI Deploy MAP).

The engine (torch, nnU-Net) is imported on first use of :class:`Segmenter` / :func:`segment`, not by
``import mrannotator``: the catalogue, the version and the batch planner stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalogue import LabelCatalogue, Structure, load_catalogue
from .errors import InputError, MRAnnotatorError, WeightsError

if TYPE_CHECKING:
    from .engine import Segmentation, Segmenter, segment

__version__ = "0.1.0"
__all__ = [
    "InputError",
    "LabelCatalogue",
    "MRAnnotatorError",
    "Segmentation",
    "Segmenter",
    "Structure",
    "WeightsError",
    "load_catalogue",
    "segment",
]
_ENGINE_NAMES = {"Segmentation", "Segmenter", "segment"}


def __getattr__(name: str):
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mrannotator' has no attribute {name!r}")
