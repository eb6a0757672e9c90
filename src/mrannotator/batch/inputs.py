"""What a batch segments: NIfTI files, DICOM MR series in a folder tree, or the rows of a CSV manifest.

Each input becomes one :class:`Case` with a safe name unique in the batch (its outputs are ``NAME_seg.nii.gz``
and ``NAME_structures.json``, as ``mrannotator segment`` names them). What cannot become a case (a CT series, a
file that is neither an image nor a sidecar, a manifest row whose path does not exist) is a :class:`Skip` with
the reason: a ``refused`` row of the cases table. Sidecars (``.json``, ``.txt``, ``.bval``...) are only counted.
Every path in a plan is absolute (resolved once, here, against the current folder or the manifest's folder).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..catalogue import expand_regions
from ..errors import InputError
from ..imageio import case_name
from .naming import Pseudonyms, make_unique, safe_name
from .routing import Route, load_region_keywords
from .scan import NIFTI_SUFFIXES, Found, chunks, is_nifti, relative_parts, scan_folders, walk

__all__ = ["NIFTI_SUFFIXES", "COHORT_FIELDS", "Case", "Plan", "Skip", "plan_inputs", "serial_map"]

# DICOM header fields copied into the cohort table (no names, ids, dates or other identifiers)
COHORT_FIELDS = ("PatientAge", "PatientSex", "Manufacturer", "MagneticFieldStrength", "SeriesDescription",
                 "BodyPartExamined")

# map_fn(func, [args, ...]) -> [func(*args), ...] in order: how the DICOM folders are scanned (serially by
# default; the batch driver passes Ray tasks for a large tree)
MapFn = Callable[[Callable, list[tuple]], list]


def serial_map(func: Callable, items: list[tuple]) -> list:
    return [func(*args) for args in items]


@dataclass
class Case:
    """One volume to segment."""

    name: str
    path: str  # the NIfTI file, or the folder holding the DICOM series (absolute)
    kind: str  # "nifti" or "dicom"
    files: tuple[str, ...]  # every file read, in slice order for DICOM (the checksum covers them, in this order)
    route: Route
    header: dict[str, str] = field(default_factory=dict)  # COHORT_FIELDS (DICOM only)
    series_uid: str = ""  # DICOM only
    series_number: str = ""
    pseudo_key: str = ""  # what a private name is made from (DICOM cases named after their folder)
    private: bool = False  # named by a pseudonym: the public tables show no path


@dataclass
class Skip:
    """An input that is not segmented, and why (a ``refused`` row of the cases table and of failures.csv)."""

    case: str
    path: str
    error: str
    series_number: str = ""
    description: str = ""
    pseudo_key: str = ""
    private: bool = False


@dataclass
class Plan:
    cases: list[Case]
    skipped: list[Skip]
    sidecars: int = 0  # non-image files ignored
    renamed: list[str] = field(default_factory=list)  # "manifest line 3: case_id '..' -> 'case'"
    excluded: list[str] = field(default_factory=list)  # folders left out of the scan (OUT inside INPUT)


def plan_inputs(source: str | Path, regions: Sequence[str] | str | None = None, map_fn: MapFn = serial_map,
                exclude: Sequence[str | Path] = (), names: Pseudonyms | None = None) -> Plan:
    """The cases of a NIfTI file, a folder tree (NIfTI files and DICOM series) or a CSV manifest.

    ``regions``: None or ``"auto"`` (DICOM routed by header keywords, NIfTI all regions), or region names for
    every case. ``map_fn`` reads the DICOM folders' headers (see :data:`MapFn`); the plan is the same whichever
    map is used. ``exclude``: folders never scanned (the output folder). ``names``: private names for DICOM.
    """
    source = Path(os.path.abspath(source))
    if not source.exists():
        raise InputError(f"input not found: {source}")
    fixed = None if regions in (None, "auto") or list(regions) == ["auto"] else tuple(regions)
    if fixed is not None:
        expand_regions(fixed)  # an unknown region is refused here, before any worker starts
    excluded = tuple(os.path.abspath(p) for p in exclude)
    if source.is_file() and source.suffix.lower() == ".csv":
        plan = _manifest_cases(source, fixed, map_fn, excluded)
    elif source.is_file() and not is_nifti(source.name):
        raise InputError(f"{source} is neither a NIfTI file, a folder nor a CSV manifest")
    else:
        rows = [_Row(str(source), str(source.parent if source.is_file() else source))]
        plan = _rows_plan(rows, fixed, map_fn, excluded)
    if names is not None:
        for item in (*plan.cases, *plan.skipped):
            item.private = bool(item.pseudo_key) or getattr(item, "kind", "") == "dicom"
            if item.pseudo_key:
                setattr(item, "name" if isinstance(item, Case) else "case", names.name(item.pseudo_key))
    make_unique(plan.skipped, "case", make_unique(plan.cases))  # one row per input case: names unique over both
    if not plan.cases and not plan.skipped:
        raise InputError(f"no NIfTI file, DICOM series or manifest row found in {source}")
    return plan


@dataclass
class _Row:
    """One thing to plan: a path (folder or file) and the folder case names are relative to."""

    path: str
    root: str
    case_id: str = ""  # the manifest's name for it (safe already)


def _rows_plan(rows: list[_Row], fixed, map_fn: MapFn, excluded: tuple[str, ...]) -> Plan:
    """Walk each row's path, read the DICOM folders' headers (in tasks of about FILES_PER_TASK files) and make
    the cases, rows in order."""
    plan = Plan([], [])
    trees = []
    for row in rows:
        tree = walk(row.path, excluded)
        plan.sidecars += tree.sidecars
        plan.excluded += tree.excluded
        trees.append(tree)
    folders = [f for tree in trees for f in tree.folders]
    found: dict[str, list[Found]] = {}
    for part in map_fn(scan_folders, [(c,) for c in chunks(folders)]):
        found.update(part)
    for row, tree in zip(rows, trees, strict=True):
        mine = _row_cases(row, tree, found, fixed)
        if row.case_id and len(mine.cases) == 1:
            mine.cases[0].name, mine.cases[0].pseudo_key = row.case_id, ""
        plan.cases += mine.cases
        plan.skipped += mine.skipped
    return plan


def _row_cases(row: _Row, tree, found: dict[str, list[Found]], fixed) -> Plan:
    plan = Plan([], [])
    prefix = [row.case_id] if row.case_id else []
    for p in tree.niftis:
        parts = relative_parts(p, row.root)
        name = safe_name("_".join([*prefix, *parts[:-1], case_name(Path(p))]))
        plan.cases.append(Case(name=name, path=p, kind="nifti", files=(p,), route=_route(fixed, None)))
    for p, why in tree.problems:
        plan.skipped.append(Skip(safe_name("_".join([*prefix, *relative_parts(p, row.root)])), p, why,
                                 pseudo_key=os.path.relpath(p, row.root)))
    for folder, _ in tree.folders:
        items = found.get(folder, [])
        n_series = sum(1 for f in items if f.uid)
        parts = [*prefix, *relative_parts(folder, row.root)]
        base = "_".join(parts) or Path(folder).name
        for f in sorted(items, key=lambda f: (not f.uid, _number(f.series_number), f.folder)):
            key = os.path.relpath(folder, row.root) + "/" + (f.uid or os.path.basename(f.folder))
            if not f.uid:  # an unusable file
                name = safe_name("_".join([*parts, os.path.basename(f.folder)]))
                plan.skipped.append(Skip(name, f.folder, f.error, pseudo_key=key))
                continue
            name = safe_name(base if n_series == 1 else f"{base}_S{f.series_number or f.uid[-8:]}")
            if f.error:
                plan.skipped.append(Skip(name, folder, f.error, f.series_number, f.header.get("SeriesDescription", ""),
                                         pseudo_key=key))
            else:
                plan.cases.append(Case(name=name, path=folder, kind="dicom", files=f.files,
                                       route=_route(fixed, f.header), series_uid=f.uid, series_number=f.series_number,
                                       header={k: f.header.get(k, "") for k in COHORT_FIELDS}, pseudo_key=key))
    return plan


def _number(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


def _route(fixed: tuple[str, ...] | None, header: dict | None) -> Route:
    if fixed is not None:
        return Route(fixed, "--regions " + " ".join(fixed))
    if header is None:
        return Route(None, "NIfTI input: no header to route by")
    return load_region_keywords().route(header)


def _manifest_cases(manifest: Path, fixed, map_fn: MapFn, excluded: tuple[str, ...]) -> Plan:
    """Rows of a CSV with a ``path`` column (and optional ``case_id``); relative paths start at the CSV's folder.
    A ``case_id`` that is not a safe file name is renamed (and said so in ``Plan.renamed``)."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.DictReader(f))
            columns = [c.strip() for c in (lines[0].keys() if lines else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the manifest {manifest}: {e}") from e
    if "path" not in columns:
        raise InputError(f"manifest {manifest} has no 'path' column (columns: {', '.join(columns) or 'none'})")
    rows: list[_Row] = []
    missing: list[Skip] = []
    renamed: list[str] = []
    for i, line in enumerate(lines, start=2):  # line 1 is the header
        line = {k.strip(): (v or "").strip() for k, v in line.items() if k}
        given, raw_id = line.get("path", ""), line.get("case_id", "")
        path = Path(os.path.abspath(manifest.parent / given)) if given else None
        case_id = safe_name(raw_id) if raw_id else ""
        if raw_id and case_id != raw_id:
            renamed.append(f"manifest line {i}: case_id {raw_id!r} -> {case_id!r}")
        if path is None or not path.exists():
            missing.append(Skip(case_id or safe_name(given or f"line{i}"), str(path or ""),
                                f"manifest line {i}: path not found", pseudo_key="" if case_id else given))
        else:
            rows.append(_Row(str(path), str(path.parent), case_id))
    plan = _rows_plan(rows, fixed, map_fn, excluded)
    plan.skipped = missing + plan.skipped
    plan.renamed = renamed
    return plan
