"""What a batch segments: NIfTI files, DICOM MR series in a folder tree, or the rows of a CSV manifest.

Each input becomes one :class:`Case` with a name unique in the batch (its outputs are ``NAME_seg.nii.gz`` and
``NAME_structures.json``, as ``mrannotator segment`` names them). What cannot become a case (a CT series, a
file that is not an image, a manifest row whose path does not exist) is a :class:`Skip` with the reason; the
batch lists it in ``failures.csv`` and goes on.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..catalogue import expand_regions
from ..errors import InputError
from ..imageio import case_name
from .routing import Route, load_region_keywords

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# DICOM header fields copied into the cohort table (no names, ids, dates or other identifiers)
COHORT_FIELDS = ("PatientAge", "PatientSex", "Manufacturer", "MagneticFieldStrength", "SeriesDescription",
                 "BodyPartExamined")
_ROUTING_ONLY = ("StudyDescription", "ProtocolName")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# map_fn(func, [args, ...]) -> [func(*args), ...] in order: how the DICOM folders are scanned (serially by
# default; the batch driver passes ``cluster.ray_map`` so that a large tree is scanned by Ray tasks)
MapFn = Callable[[Callable, list[tuple]], list]


def serial_map(func: Callable, items: list[tuple]) -> list:
    return [func(*args) for args in items]


@dataclass
class Case:
    """One volume to segment."""

    name: str
    path: str  # the NIfTI file, or the folder holding the DICOM series
    kind: str  # "nifti" or "dicom"
    files: tuple[str, ...]  # every file read (the checksum covers them, in this order)
    route: Route
    header: dict[str, str] = field(default_factory=dict)  # COHORT_FIELDS (DICOM only)
    series_uid: str = ""  # DICOM only: the series in ``path`` (found again there by the worker)


@dataclass(frozen=True)
class Skip:
    """An input that is not segmented, and why (a row of failures.csv)."""

    case: str
    path: str
    error: str


@dataclass
class Plan:
    cases: list[Case]
    skipped: list[Skip]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _relative_name(path: Path, root: Path, file: bool) -> str:
    """A case name from a path below ``root``: its parts joined by ``_``, file suffix dropped."""
    try:
        parts = list(path.relative_to(root).parts)
    except ValueError:
        parts = [path.name]
    if file:
        parts[-1] = case_name(Path(parts[-1]))
    if not parts or parts == ["."]:
        parts = [case_name(root) if file else root.name]
    return _UNSAFE.sub("-", "_".join(parts)) or "case"


def plan_inputs(source: str | Path, regions: Sequence[str] | str | None = None, map_fn: MapFn = serial_map) -> Plan:
    """The cases of a NIfTI file, a folder tree (NIfTI files and DICOM series) or a CSV manifest.

    ``regions``: None (DICOM routed by header keywords, NIfTI all regions), ``"auto"`` (the same), or
    region names applied to every case. ``map_fn`` scans the DICOM folders (see :data:`MapFn`); the plan is
    the same whichever map is used.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    fixed = None if regions in (None, "auto") or list(regions) == ["auto"] else tuple(regions)
    if fixed is not None:
        expand_regions(fixed)  # an unknown region is refused here, before any worker starts
    if source.is_file() and source.suffix.lower() == ".csv":
        plan = _manifest_cases(source, fixed, map_fn)
    elif source.is_file():
        if not is_nifti(source):
            raise InputError(f"{source} is neither a NIfTI file, a folder nor a CSV manifest")
        plan = Plan([_nifti_case(source, case_name(source), fixed)], [])
    else:
        plan = _folder_cases(source, source, fixed, map_fn)
    _make_names_unique(plan.cases)
    if not plan.cases and not plan.skipped:
        raise InputError(f"no NIfTI file, DICOM series or manifest row found in {source}")
    return plan


def _fixed_route(fixed: tuple[str, ...] | None, default_reason: str) -> Route:
    if fixed is None:
        return Route(None, default_reason)
    return Route(fixed, "--regions " + " ".join(fixed))


def _nifti_case(path: Path, name: str, fixed) -> Case:
    route = _fixed_route(fixed, "NIfTI input: no header to route by")
    return Case(name=name, path=str(path), kind="nifti", files=(str(path),), route=route)


def _folder_cases(folder: Path, root: Path, fixed, map_fn: MapFn, name: str | None = None) -> Plan:
    """NIfTI files anywhere below ``folder`` and every DICOM series there (other files: skipped)."""
    entries = sorted(folder.rglob("*")) if folder.is_dir() else [folder]
    niftis = [p for p in entries if p.is_file() and is_nifti(p)]
    cases = [_nifti_case(p, _relative_name(p, root, True), fixed) for p in niftis]
    if name is not None and len(niftis) == 1:
        cases[0].name = name
    if all(p.is_dir() or p in niftis for p in entries):
        return Plan(cases, [])  # NIfTI only: no DICOM scan
    dicom_cases, skipped = _dicom_cases(folder, root, fixed, set(niftis), map_fn, name=name)
    return Plan(cases + dicom_cases, skipped)


def _dicom_cases(folder: Path, root: Path, fixed, ignore: set[Path], map_fn: MapFn, name: str | None = None
                 ) -> tuple[list[Case], list[Skip]]:
    """Every DICOM series below ``folder``, read only through the project's DICOM module (``find_series``).

    A folder of study folders is scanned one top-level folder at a time (a series is expected within one
    top-level folder), each through ``map_fn``: a scan holds one study's headers at once and returns only the
    cases, so a Ray task per few folders can do it anywhere in the cluster. An accepted MR series is a case named
    after its folder (plus its series number when a folder holds several); a rejected series (CT, localizer,
    broken stack, ...) and every unusable file is a Skip.
    """
    units = [folder]
    if folder.is_dir() and all(p.is_dir() or p in ignore for p in folder.iterdir()):
        units = sorted(p for p in folder.iterdir() if p.is_dir())
    cases: list[Case] = []
    skipped: list[Skip] = []
    for more_cases, more_skipped in map_fn(_scan_unit, [(u, root, fixed, name) for u in units]):
        cases += more_cases
        skipped += [s for s in more_skipped if Path(s.path) not in ignore]  # NIfTI files are cases, not skips
    return cases, skipped


def _scan_unit(unit: Path, root: Path, fixed, name: str | None) -> tuple[list[Case], list[Skip]]:
    from ..dicom import find_series

    scan = find_series(unit)
    by_folder: dict[Path, list] = {}
    for s in scan.series:
        common = Path(os.path.commonpath([str(f) for f in s.files]))  # the series' folder
        by_folder.setdefault(common.parent if common.is_file() else common, []).append(s)
    cases = []
    for parent, series in sorted(by_folder.items()):
        base = name or _relative_name(parent, root, False)
        for s in sorted(series, key=lambda s: int(getattr(s.header, "SeriesNumber", 0) or 0)):
            case = base if len(series) == 1 else f"{base}_S{getattr(s.header, 'SeriesNumber', '') or s.uid[-8:]}"
            header = {k: _header_text(s.header, k) for k in (*COHORT_FIELDS, *_ROUTING_ONLY)}
            route = _fixed_route(fixed, "") if fixed else load_region_keywords().route(header)
            # the worker finds the series again (by UID, in this folder): headers are not kept or shipped
            cases.append(Case(name=case, path=str(parent), kind="dicom", files=tuple(str(f) for f in s.files),
                              route=route, header={k: header[k] for k in COHORT_FIELDS}, series_uid=s.uid))
    skipped = [Skip(_relative_name(Path(p), root, True), str(p), why) for p, why in scan.skipped]
    skipped += [Skip(f"{_relative_name(unit, root, False)} series {r.series_uid}", str(unit),
                     f"{r.description}: {r.reason}") for r in scan.rejected]
    return cases, skipped


def _header_text(ds, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    if value is None:
        return ""
    return str(value).strip()


def _manifest_cases(manifest: Path, fixed, map_fn: MapFn) -> Plan:
    """Rows of a CSV with a ``path`` column (and optional ``case_id``); relative paths start at the CSV's folder.

    Rows that name folders (or DICOM files) are scanned through ``map_fn``, one row per call, in row order.
    """
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the manifest {manifest}: {e}") from e
    if "path" not in columns:
        raise InputError(f"manifest {manifest} has no 'path' column (columns: {', '.join(columns) or 'none'})")
    found: list[Case | Skip | tuple] = []  # in row order; a tuple is a folder still to scan
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        given = row.get("path", "")
        path = Path(given) if Path(given).is_absolute() else manifest.parent / given
        name = _UNSAFE.sub("-", row["case_id"]) if row.get("case_id") else None
        label = name or given or f"line {i}"
        if not given or not path.exists():
            found.append(Skip(label, str(path), f"manifest line {i}: path {given!r} not found"))
        elif path.is_file() and is_nifti(path):
            found.append(_nifti_case(path, name or case_name(path), fixed))
        else:
            found.append((path, path.parent, fixed, name))
    scanned = iter(map_fn(_manifest_folder, [f for f in found if isinstance(f, tuple)]))
    cases: list[Case] = []
    skipped: list[Skip] = []
    for f in found:
        if isinstance(f, Case):
            cases.append(f)
        elif isinstance(f, Skip):
            skipped.append(f)
        else:
            sub = next(scanned)
            cases += sub.cases
            skipped += sub.skipped
    return Plan(cases, skipped)


def _manifest_folder(path: Path, root: Path, fixed, name: str | None) -> Plan:
    return _folder_cases(path, root, fixed, serial_map, name=name)


def _make_names_unique(cases: list[Case]) -> None:
    """Two inputs with the same name (a.nii and a.nii.gz, or duplicate case_ids) get _2, _3, ... in input order."""
    used: set[str] = set()
    for c in cases:
        base, n = c.name, 1
        while c.name in used:
            n += 1
            c.name = f"{base}_{n}"
        used.add(c.name)
