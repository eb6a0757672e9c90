"""Evaluation like the MRAnnotator paper: per-structure Dice, HD95 and ASD, confidence intervals, region tables.

``mrannotator evaluate --pred PRED_DIR --truth TRUTH_DIR`` (or :func:`evaluate` in Python) pairs label maps
by file name, brings both sides to catalogue ids (a label map file renames a foreign scheme, e.g.
TotalSegmentator's ``total_mr`` values, see ``data/totalsegmentator_total_mr.csv``) and measures, per case
and structure, the Dice coefficient, the 95th-percentile Hausdorff distance and the average symmetric
surface distance in millimetres with MONAI's metrics on the case's own voxel grid.

Per structure the Dice values get a Shapiro-Wilk test; a normal sample gets the t-based (normal-theory)
95% interval of the mean, any other sample a seeded percentile bootstrap of the mean (1,000 resamples),
as in the paper. Regions and the overall row average, per case, the Dice of the structures measured in
that case, and summarise those per-case means the same way (cases are the independent units).

A structure absent from both prediction and truth in a case is not measured in that case; one present
on one side only counts as Dice 0 (missed or false positive) and has no surface distance. Whatever is
skipped (a case without its pair, a grid mismatch, an unreadable file, a label value nobody knows) is
listed in the report with the reason.

Modules: ``labelmaps`` (foreign label schemes -> catalogue ids), ``metrics`` (one case), ``statistics``
(intervals, summaries), ``reports`` (tables, Markdown, figure), ``cases`` (pairing, many cases); the
``mrannotator evaluate`` command is in ``mrannotator.cli``.
"""

from .cases import evaluate, evaluate_pairs, pair_cases
from .labelmaps import BUILTIN_LABEL_MAPS, LabelMap, identity_map, load_label_map
from .metrics import GRID_TOLERANCE_MM, align_to_truth, evaluate_case, measure_structures
from .reports import (
    Evaluation,
    comparison_markdown,
    dice_figure,
    format_ci,
    region_title,
    report_markdown,
    skipped_summary,
)
from .statistics import (
    BOOTSTRAP_RESAMPLES,
    NORMALITY_ALPHA,
    confidence_interval,
    summarise_regions,
    summarise_structures,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BUILTIN_LABEL_MAPS",
    "GRID_TOLERANCE_MM",
    "NORMALITY_ALPHA",
    "Evaluation",
    "LabelMap",
    "align_to_truth",
    "comparison_markdown",
    "confidence_interval",
    "dice_figure",
    "evaluate",
    "evaluate_case",
    "evaluate_pairs",
    "format_ci",
    "identity_map",
    "load_label_map",
    "measure_structures",
    "pair_cases",
    "region_title",
    "report_markdown",
    "skipped_summary",
    "summarise_regions",
    "summarise_structures",
]
