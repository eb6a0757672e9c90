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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..catalogue import expand_regions
from ..errors import InputError
from ..imageio import case_name
from .naming import Pseudonyms, make_unique, safe_name
from .routing import Route, load_region_keywords
from .scan import FIRST_TASK_FILES, NIFTI_SUFFIXES, Found, chunks, is_nifti, relative_parts, scan_folders, walk

__all__ = ["NIFTI_SUFFIXES", "COHORT_FIELDS", "SPLIT_SERIES", "Case", "Plan", "Skip", "join_part", "plan_inputs",
           "plan_stream", "serial_map"]

# DICOM header fields copied into the cohort table (no names, ids, dates or other identifiers)
COHORT_FIELDS = ("PatientAge", "PatientSex", "Manufacturer", "MagneticFieldStrength", "SeriesDescription",
                 "BodyPartExamined")

# map_fn(func, [args, ...]) -> [func(*args), ...] in order (a list, or an iterator that yields each result as it
# is ready): how the DICOM folders are scanned (serially by default; the batch driver passes Ray tasks for a large
# tree)
MapFn = Callable[[Callable, list[tuple]], Iterable]


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
    stack: str = ""  # DICOM: the 3D stack chosen (e.g. "echo=2") when the series holds several


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
    series_uid: str = ""  # a refused DICOM series


@dataclass
class Plan:
    cases: list[Case]
    skipped: list[Skip]
    sidecars: int = 0  # non-image files ignored
    renamed: list[str] = field(default_factory=list)  # "manifest line 3: case_id '..' -> 'case'"
    excluded: list[str] = field(default_factory=list)  # folders left out of the scan (OUT inside INPUT)
    split: list[str] = field(default_factory=list)  # cases whose series UID another folder also has (refuse them)


def plan_inputs(source: str | Path, regions: Sequence[str] | str | None = None, map_fn: MapFn = serial_map,
                exclude: Sequence[str | Path] = (), names: Pseudonyms | None = None, stack: str | None = None) -> Plan:
    """The cases of a NIfTI file, a folder tree (NIfTI files and DICOM series) or a CSV manifest: every part of
    :func:`plan_stream`, joined. ``regions``: None or ``"auto"`` (DICOM routed by header keywords, NIfTI all
    regions), or region names for every case. ``map_fn`` reads the DICOM folders' headers (see :data:`MapFn`); the
    plan is the same whichever map is used. ``exclude``: folders never scanned (the output folder). ``names``:
    private names for DICOM. ``stack``: the 3D stack of DICOM series that hold several (``echo=2``...)."""
    plan = Plan([], [])
    for part in plan_stream(source, regions, map_fn, exclude, names, stack):
        join_part(plan, part)
    return refuse_split(plan)


def refuse_split(plan: Plan) -> Plan:
    """The cases listed in ``plan.split`` (the first folder of a series split across folders) moved to the refused
    inputs."""
    split = set(plan.split)
    for c in [c for c in plan.cases if c.name in split]:
        plan.cases.remove(c)
        plan.skipped.append(split_skip(c, "another folder"))
    return plan


def split_skip(case: Case, other: str) -> Skip:
    return Skip(case.name, case.path, f"{SPLIT_SERIES}: its SeriesInstanceUID is also in {other}; put all its files "
                "in one folder", case.series_number, case.header.get("SeriesDescription", ""), case.pseudo_key,
                case.private, case.series_uid)


def join_part(plan: Plan, part: Plan) -> None:
    plan.cases += part.cases
    plan.skipped += part.skipped
    plan.sidecars += part.sidecars
    plan.renamed += part.renamed
    plan.excluded += part.excluded
    plan.split += part.split


def plan_stream(source: str | Path, regions: Sequence[str] | str | None = None, map_fn: MapFn = serial_map,
                exclude: Sequence[str | Path] = (), names: Pseudonyms | None = None,
                stack: str | None = None) -> Iterator[Plan]:
    """The plan in parts, as the DICOM headers are read (a part per folder, in tree order): the first part has
    what the tree listing alone tells (NIfTI files, sidecars, unreadable entries, missing manifest rows), then
    each DICOM folder's series as soon as its task is back (``map_fn`` may return an iterator). Case names are
    unique over the whole stream, given in stream order (a part's cases before its refused inputs); a series
    whose SeriesInstanceUID was already planned in another folder is refused (:data:`SPLIT_SERIES`) and the
    first folder's case is listed in ``Plan.split``. Raises InputError before the first part for a bad input,
    and after the last when nothing was found."""
    source = Path(os.path.abspath(source))
    if not source.exists():
        raise InputError(f"input not found: {source}")
    fixed = None if regions in (None, "auto") or list(regions) == ["auto"] else tuple(regions)
    if fixed is not None:
        expand_regions(fixed)  # an unknown region is refused here, before any worker starts
    if stack is not None:
        from ..dicom.stacks import parse_stack

        parse_stack(stack)  # a malformed key is refused here too
    excluded = tuple(os.path.abspath(p) for p in exclude)
    head = Plan([], [])
    if source.is_file() and source.suffix.lower() == ".csv":
        rows, head.skipped, head.renamed = _manifest_rows(source)
    elif source.is_file() and not is_nifti(source.name):
        raise InputError(f"{source} is neither a NIfTI file, a folder nor a CSV manifest")
    else:
        rows = [_Row(str(source), str(source.parent if source.is_file() else source))]
    namer = _Namer(names)
    empty = True
    for part in _rows_stream(rows, head, fixed, map_fn, excluded, stack):
        empty = empty and not part.cases and not part.skipped
        yield namer(part)
    if empty:
        raise InputError(f"no NIfTI file, DICOM series or manifest row found in {source}")


SPLIT_SERIES = "series split across folders"


class _Namer:
    """Private names, then names unique over the whole stream; refuses a series UID seen in another folder."""

    def __init__(self, names: Pseudonyms | None):
        self.names, self.used = names, set()
        self.uids: dict[str, tuple[str, Case | Skip]] = {}  # series UID -> its first folder and case

    def __call__(self, part: Plan) -> Plan:
        if self.names is not None:
            for item in (*part.cases, *part.skipped):
                item.private = bool(item.pseudo_key) or getattr(item, "kind", "") == "dicom"
                if item.pseudo_key:
                    setattr(item, "name" if isinstance(item, Case) else "case", self.names.name(item.pseudo_key))
        make_unique(part.skipped, "case", make_unique(part.cases, used=self.used))
        kept = []
        for c in part.cases:
            if not self._split(c, c.series_uid, c.path, part):
                kept.append(c)
        for s in list(part.skipped):
            self._split(s, s.series_uid, s.path, part)
        part.cases = kept
        return part

    def _split(self, item: Case | Skip, uid: str, folder: str, part: Plan) -> bool:
        """Whether ``item`` (accepted or refused) is a series another folder also has; if so it is refused (in
        ``part``) and so is the first folder's (a case: listed in ``part.split``; a refused series: its reason)."""
        first_folder, first = self.uids.setdefault(uid, (folder, item)) if uid else (folder, item)
        if first_folder == folder:  # the same folder twice (two manifest rows): not split
            return False
        name = first.name if isinstance(first, Case) else first.case
        if isinstance(first, Case):
            part.split.append(first.name)
        elif not first.error.startswith(SPLIT_SERIES):
            first.error = f"{SPLIT_SERIES}: its SeriesInstanceUID is also in another folder; put all its files in " \
                          f"one folder (this folder alone: {first.error})"
        if isinstance(item, Case):
            part.skipped.append(split_skip(item, f"the folder of case {name}"))
        elif not item.error.startswith(SPLIT_SERIES):
            item.error = f"{SPLIT_SERIES}: its SeriesInstanceUID is also in the folder of case {name}; put all its " \
                         f"files in one folder (this folder alone: {item.error})"
        return True


@dataclass
class _Row:
    """One thing to plan: a path (folder or file) and the folder case names are relative to."""

    path: str
    root: str
    case_id: str = ""  # the manifest's name for it (safe already)


def _rows_stream(rows: list[_Row], head: Plan, fixed, map_fn: MapFn, excluded: tuple[str, ...],
                 stack: str | None) -> Iterator[Plan]:
    """Walk each row's path, then read the DICOM folders' headers (in tasks of about FILES_PER_TASK files) and
    yield the cases folder by folder, rows in order (a row with a ``case_id`` as one part, once complete)."""
    trees = []
    for row in rows:
        tree = walk(row.path, excluded)
        head.sidecars += tree.sidecars
        head.excluded += tree.excluded
        trees.append(tree)
    held = {i: Plan([], []) for i, row in enumerate(rows) if row.case_id}  # whole rows, named once complete
    for i, (row, tree) in enumerate(zip(rows, trees, strict=True)):
        join_part(held.get(i, head), _loose_cases(row, tree, fixed))
    yield head
    folders = [(i, f) for i, tree in enumerate(trees) for f in tree.folders]
    found = _found_in_order(folders, map_fn, stack)
    left = Counter(i for i, _ in folders)
    for i, _ in folders:
        folder, items = next(found)
        part = _folder_cases(rows[i], folder, items, fixed)
        left[i] -= 1
        if i not in held:
            yield part
            continue
        join_part(held[i], part)
        if not left[i]:
            yield _named_row(rows[i], held.pop(i))
    for i in sorted(held):  # rows with a case_id and no DICOM folder
        yield _named_row(rows[i], held[i])


def _found_in_order(folders: list[tuple[int, tuple[str, int]]], map_fn: MapFn, stack: str | None):
    """(folder, its series) for each DICOM folder, in order, read in tasks of about FILES_PER_TASK files (the
    first task smaller, so that the first cases are planned soon)."""
    groups = chunks([f for _, f in folders], first=FIRST_TASK_FILES)
    for part in map_fn(scan_folders, [(g, stack) for g in groups]):
        yield from part


def _named_row(row: _Row, plan: Plan) -> Plan:
    if len(plan.cases) == 1:
        plan.cases[0].name, plan.cases[0].pseudo_key = row.case_id, ""
    return plan


def _loose_cases(row: _Row, tree, fixed) -> Plan:
    """A row's NIfTI files and the entries the listing could not read."""
    plan = Plan([], [])
    prefix = [row.case_id] if row.case_id else []
    for p in tree.niftis:
        parts = relative_parts(p, row.root)
        name = safe_name("_".join([*prefix, *parts[:-1], case_name(Path(p))]))
        plan.cases.append(Case(name=name, path=p, kind="nifti", files=(p,), route=_route(fixed, None)))
    for p, why in tree.problems:
        plan.skipped.append(Skip(safe_name("_".join([*prefix, *relative_parts(p, row.root)])), p, why,
                                 pseudo_key=os.path.relpath(p, row.root)))
    return plan


def _folder_cases(row: _Row, folder: str, items: list[Found], fixed) -> Plan:
    plan = Plan([], [])
    n_series = sum(1 for f in items if f.uid)
    parts = [*([row.case_id] if row.case_id else []), *relative_parts(folder, row.root)]
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
                                     pseudo_key=key, series_uid=f.uid))
        else:
            plan.cases.append(Case(name=name, path=folder, kind="dicom", files=f.files,
                                   route=_route(fixed, f.header), series_uid=f.uid, series_number=f.series_number,
                                   header={k: f.header.get(k, "") for k in COHORT_FIELDS}, pseudo_key=key,
                                   stack=f.stack))
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


def _manifest_rows(manifest: Path) -> tuple[list[_Row], list[Skip], list[str]]:
    """Rows of a CSV with a ``path`` column (and optional ``case_id``); relative paths start at the CSV's folder.
    A ``case_id`` that is not a safe file name is renamed (and said so in the notes); a missing path is a Skip."""
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
    return rows, missing, renamed
