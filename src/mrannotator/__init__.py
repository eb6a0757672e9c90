"""MRAnnotator: MRI multi-structure segmentation with nnU-Net v2 (engine, MONAI Label app, MONAI Deploy MAP)."""

from .catalogue import LabelCatalogue, Structure, load_catalogue
from .engine import Segmentation, Segmenter, segment
from .errors import InputError, MRAnnotatorError, WeightsError

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
