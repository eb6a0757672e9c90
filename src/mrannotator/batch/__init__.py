"""Cohort-scale segmentation on Ray: thousands of studies, resumable, with a cohort table and a figure.

    from mrannotator.batch import run_batch
    summary = run_batch("studies/", "out/")            # local Ray started here; or address="auto" / "ray://..."
    summary.processed, summary.failed                   # out/cases.csv (one row per input case), cohort.parquet,
                                                        # cohort.csv (per structure), failures.csv, cohort.png

The same as ``mrannotator batch -i INPUT -o OUT``. Modules: :mod:`.inputs` (cases from NIfTI files, DICOM
trees, CSV manifests), :mod:`.routing` (header keywords -> regions), :mod:`.worker` (the Ray actor holding a
Segmenter), :mod:`.cluster` (Ray), :mod:`.driver` (dispatch, retries, progress), :mod:`.ledger` (resume),
:mod:`.tables` (cohort outputs), :mod:`.cli` (the subcommand), :mod:`.feed` (the plan streamed to the dispatcher),
:mod:`.pool` (the workers), :mod:`.scan` (walking a tree, reading DICOM
headers per folder), :mod:`.naming` (safe and private case names), :mod:`.progress` (the progress line).
"""

from .driver import BatchSummary, run_batch
from .inputs import Case, Plan, Skip, plan_inputs
from .routing import Route, load_region_keywords

__all__ = ["BatchSummary", "Case", "Plan", "Route", "Skip", "load_region_keywords", "plan_inputs", "run_batch"]
