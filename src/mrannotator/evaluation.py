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
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .catalogue import REGIONS, LabelCatalogue, load_catalogue
from .errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# label maps shipped in mrannotator/data, usable by name with --truth-labels / --pred-labels
BUILTIN_LABEL_MAPS = {"total_mr": "totalsegmentator_total_mr.csv"}
NORMALITY_ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 1000
# prediction and truth grids must agree to this (mm in the affine) to be compared voxel by voxel
GRID_TOLERANCE_MM = 1e-3


# ------------------------------------------------------------------ label maps
@dataclass(frozen=True)
class LabelMap:
    """Label value in a file -> catalogue id; ``ignored`` values are known but have no catalogue structure."""

    ids: dict[int, int]
    ignored: dict[int, str] = field(default_factory=dict)  # value -> the source's name for it
    source: str = "catalogue ids"

    def describe(self, value: int) -> str:
        return self.ignored.get(value, "")


def identity_map(catalogue: LabelCatalogue | None = None) -> LabelMap:
    cat = catalogue or load_catalogue()
    return LabelMap({s.id: s.id for s in cat}, source="catalogue ids")


def load_label_map(source: str | Path, catalogue: LabelCatalogue | None = None) -> LabelMap:
    """A label map from a CSV or JSON file, or a built-in name (``total_mr``).

    CSV: a header with ``value`` and ``structure`` (catalogue name or id; empty = no catalogue
    structure, ignored on purpose); other columns (e.g. ``source_name``) are kept as descriptions.
    JSON: ``{"<value>": "<catalogue name>" | <catalogue id> | null}``, or names to values
    (``{"<name>": <value>}`` or an nnU-Net ``dataset.json`` ``{"labels": {...}}``), where names the
    catalogue does not know are ignored (and reported when they occur).
    Several values may map to one structure (e.g. left and right femur -> ``upper_femora``).
    """
    cat = catalogue or load_catalogue()
    name = str(source)
    if name in BUILTIN_LABEL_MAPS:
        text = resources.files("mrannotator").joinpath("data", BUILTIN_LABEL_MAPS[name]).read_text()
        return _parse_csv_map(text, f"built-in map {name!r}", cat)
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"label map not found: {path} (give a CSV or JSON file, or one of: {', '.join(BUILTIN_LABEL_MAPS)})"
        )
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"label map {path} is not valid JSON: {e}") from e
        return _parse_json_map(data, str(path), cat)
    return _parse_csv_map(text, str(path), cat)


def _target(value, where: str, cat: LabelCatalogue) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            return cat.by_id(int(value)).id
        except KeyError:
            raise InputError(f"{where}: catalogue id {value} does not exist") from None
    s = cat.find(str(value))
    if s is None:
        raise InputError(
            f"{where}: {value!r} is not a structure of the MRAnnotator label catalogue (use a catalogue name, "
            "e.g. 'kidney_left', or leave it empty to ignore that label on purpose)"
        )
    return s.id


def _value(key, where: str) -> int:
    try:
        v = int(str(key).strip())
    except ValueError:
        raise InputError(f"{where}: label value {key!r} is not an integer") from None
    if v < 0:
        raise InputError(f"{where}: label value {v} is negative")
    return v


def _parse_csv_map(text: str, where: str, cat: LabelCatalogue) -> LabelMap:
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = {f.strip().lower() for f in (rows[0].keys() if rows else [])}
    if not rows or "value" not in fields or not ({"structure", "name"} & fields):
        raise InputError(f"label map {where}: needs a header with the columns 'value' and 'structure'")
    ids, ignored = {}, {}
    for i, raw in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        v = _value(row["value"], f"label map {where}, line {i}")
        target = row.get("structure", row.get("name", ""))
        sid = _target(target, f"label map {where}, line {i}", cat)
        if v in ids or v in ignored:
            raise InputError(f"label map {where}, line {i}: value {v} is listed twice")
        if sid is None:
            ignored[v] = row.get("source_name") or "no catalogue structure"
        else:
            ids[v] = sid
    return LabelMap(ids, ignored, source=where)


def _parse_json_map(data, where: str, cat: LabelCatalogue) -> LabelMap:
    ids, ignored = {}, {}
    by_name = isinstance(data, dict) and data and all(
        not str(k).strip().isdigit() and isinstance(v, int) for k, v in data.items())
    if by_name:  # {"spleen": 1, ...}: name -> value, like dataset.json's labels
        data = {"labels": data}
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):  # nnU-Net dataset.json: name -> value
        for name, v in data["labels"].items():
            v = _value(v, f"label map {where}, label {name!r}")
            if v == 0:
                continue
            s = cat.find(name)
            if s is None:
                ignored[v] = name
            else:
                ids[v] = s.id
        return LabelMap(ids, ignored, source=where)
    if not isinstance(data, dict):
        raise InputError(f"label map {where}: expected an object {{\"<value>\": \"<structure>\"}}")
    for key, target in data.items():
        v = _value(key, f"label map {where}")
        sid = _target(target, f"label map {where}, value {v}", cat)
        if sid is None:
            ignored[v] = "no catalogue structure"
        else:
            ids[v] = sid
    return LabelMap(ids, ignored, source=where)


# ------------------------------------------------------------------ one case
def _as_label_image(source, what: str):
    """A label volume as a nibabel image with integer values (paths and images accepted)."""
    from .imageio import load_image

    img = load_image(source)
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError(f"{what} is not a label map: it has non-integer values")
        data = data.astype(np.int64)
    return img, data


def _same_grid(a_aff, a_shape, b_aff, b_shape) -> bool:
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_aff, b_aff, atol=GRID_TOLERANCE_MM, rtol=0)


def _describe_grid(aff, shape) -> str:
    import nibabel as nib

    from .orientation import voxel_spacing

    sp = ", ".join(f"{s:.3g}" for s in voxel_spacing(aff))
    codes = "".join(nib.orientations.aff2axcodes(aff))
    origin = ", ".join(f"{x:.1f}" for x in np.asarray(aff)[:3, 3])
    return f"{tuple(int(n) for n in shape)} voxels of ({sp}) mm, {codes}, origin ({origin})"


def align_to_truth(pred_data: np.ndarray, pred_affine, truth_data: np.ndarray, truth_affine, case: str = ""):
    """The prediction on the truth's grid: as is, or losslessly re-stored (axis permutation / flip only).

    Raises InputError when the two grids differ in anything else (size, spacing, position): evaluating
    then would need resampling, which changes the labels being judged.
    """
    import nibabel as nib

    from .orientation import reorient_to

    if _same_grid(pred_affine, pred_data.shape, truth_affine, truth_data.shape):
        return pred_data, False
    codes = nib.orientations.aff2axcodes(truth_affine)
    arr, aff, _ = reorient_to(pred_data, np.asarray(pred_affine, float), codes)
    if _same_grid(aff, arr.shape, truth_affine, truth_data.shape):
        return arr, True
    raise InputError(
        f"{case + ': ' if case else ''}prediction and truth are on different grids: prediction "
        f"{_describe_grid(pred_affine, pred_data.shape)}, truth {_describe_grid(truth_affine, truth_data.shape)}; "
        "resample the prediction onto the truth image (nearest neighbour) before evaluating"
    )


def _to_ids(data: np.ndarray, lmap: LabelMap) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Catalogue ids, plus {value: voxels} of values the map ignores and of values nobody knows."""
    values, inverse, counts = np.unique(data, return_inverse=True, return_counts=True)
    lut = np.zeros(len(values), np.uint8)
    ignored, unknown = {}, {}
    for k, (v, n) in enumerate(zip(values.tolist(), counts.tolist(), strict=True)):
        if v == 0:
            continue
        if v in lmap.ids:
            lut[k] = lmap.ids[v]
        elif v in lmap.ignored:
            ignored[int(v)] = int(n)
        else:
            unknown[int(v)] = int(n)
    return lut[inverse.reshape(data.shape)], ignored, unknown


def _bbox(slices_a, slices_b, sid: int, shape, margin: int = 1) -> tuple[slice, ...]:
    boxes = [s[sid - 1] for s in (slices_a, slices_b) if sid - 1 < len(s) and s[sid - 1] is not None]
    return tuple(
        slice(max(0, min(b[ax].start for b in boxes) - margin), min(shape[ax], max(b[ax].stop for b in boxes) + margin))
        for ax in range(len(shape))
    )


def measure_structures(pred_ids: np.ndarray, truth_ids: np.ndarray, spacing: Sequence[float],
                       ids: Iterable[int] | None = None, distances: bool = True) -> list[dict]:
    """Dice, HD95 (mm) and ASD (mm) per catalogue id present in either map (MONAI's metrics).

    Both arrays hold catalogue ids on the same grid; ``spacing`` is the voxel size (mm) along each
    array axis. Ids absent from both are left out. Distances are None when one side is empty (or when
    ``distances`` is False: Dice only).
    """
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    from scipy.ndimage import find_objects

    pred_ids = np.asarray(pred_ids)
    truth_ids = np.asarray(truth_ids)
    if pred_ids.shape != truth_ids.shape:
        raise InputError(f"prediction {pred_ids.shape} and truth {truth_ids.shape} differ in shape")
    present = (set(np.unique(pred_ids).tolist()) | set(np.unique(truth_ids).tolist())) - {0}
    wanted = sorted(present if ids is None else present & {int(i) for i in ids})
    boxes_p, boxes_t = find_objects(pred_ids.astype(np.int32)), find_objects(truth_ids.astype(np.int32))
    spacing = [float(s) for s in spacing]
    rows = []
    for sid in wanted:
        box = _bbox(boxes_p, boxes_t, sid, pred_ids.shape)
        p = pred_ids[box] == sid
        t = truth_ids[box] == sid
        n_p, n_t = int(p.sum()), int(t.sum())
        yp = torch.from_numpy(p[None, None].astype(np.float32))
        yt = torch.from_numpy(t[None, None].astype(np.float32))
        dice = float(compute_dice(yp, yt, include_background=True, ignore_empty=False)[0, 0])
        hd95 = asd = None
        if n_p and n_t and distances:
            hd95 = float(compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                    spacing=spacing)[0, 0])
            asd = float(compute_average_surface_distance(yp, yt, include_background=True, symmetric=True,
                                                         spacing=spacing)[0, 0])
        status = "measured" if n_p and n_t else ("missed" if n_t else "false positive")
        rows.append({"id": sid, "truth_voxels": n_t, "pred_voxels": n_p, "dice": dice, "hd95_mm": hd95,
                     "asd_mm": asd, "status": status})
    return rows


def evaluate_case(pred, truth, *, truth_labels: LabelMap | str | Path | None = None,
                  pred_labels: LabelMap | str | Path | None = None, structures: Iterable[int] | None = None,
                  case: str = "case", catalogue: LabelCatalogue | None = None) -> tuple[list[dict], list[dict]]:
    """Rows (one per structure measured) and notes (what was ignored) for one prediction/truth pair.

    ``pred`` and ``truth`` are paths or nibabel images; label maps are :class:`LabelMap` or anything
    :func:`load_label_map` reads. A grid mismatch or an unreadable file raises :class:`InputError`.
    """
    from .orientation import voxel_spacing

    cat = catalogue or load_catalogue()
    ident = identity_map(cat)
    if isinstance(truth_labels, (str, Path)):
        truth_labels = load_label_map(truth_labels, cat)
    if isinstance(pred_labels, (str, Path)):
        pred_labels = load_label_map(pred_labels, cat)
    truth_img, truth_data = _as_label_image(truth, f"truth of {case}")
    pred_img, pred_data = _as_label_image(pred, f"prediction of {case}")
    pred_data, _ = align_to_truth(pred_data, pred_img.affine, truth_data, truth_img.affine, case)
    notes = []
    mapped = {}
    for side, data, lmap in (("truth", truth_data, truth_labels or ident), ("prediction", pred_data,
                                                                            pred_labels or ident)):
        ids, ignored, unknown = _to_ids(data, lmap)
        mapped[side] = ids
        flag = "--truth-labels" if side == "truth" else "--pred-labels"
        for v, n in sorted(unknown.items()):
            notes.append({"case": case, "skipped": f"{side} label {v}", "voxels": n, "reason": (
                f"label value {v} in the {side} is unknown: not in {lmap.source}; its voxels count as background "
                f"(give a label map with {flag})")})
        for v, n in sorted(ignored.items()):
            notes.append({"case": case, "skipped": f"{side} label {v}", "voxels": n, "reason": (
                f"label value {v} ({lmap.describe(v)}) in the {side} has no catalogue structure in {lmap.source}; "
                "ignored")})
    spacing = voxel_spacing(truth_img.affine)
    rows = measure_structures(mapped["prediction"], mapped["truth"], spacing, structures)
    for r in rows:
        s = cat.by_id(r["id"])
        r.update({"case": case, "structure": s.name, "display": s.display, "region": s.region})
    order = ("case", "region", "structure", "display", "id", "truth_voxels", "pred_voxels", "dice", "hd95_mm",
             "asd_mm", "status")
    return [{k: r[k] for k in order} for r in rows], notes


# ------------------------------------------------------------------ statistics
def confidence_interval(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, normality_alpha: float = NORMALITY_ALPHA) -> dict:
    """Shapiro-Wilk test, then a normal-theory (t) interval if normal, else a seeded percentile bootstrap.

    Returns n, mean, sd, median, shapiro_w, shapiro_p, normal (bool or None when untestable), ci_low,
    ci_high and method ("normal", "bootstrap", "constant" or "none" for n < 3).
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    n = int(x.size)
    out = {"n": n, "mean": float(x.mean()) if n else None, "sd": float(x.std(ddof=1)) if n > 1 else None,
           "median": float(np.median(x)) if n else None, "shapiro_w": None, "shapiro_p": None, "normal": None,
           "ci_low": None, "ci_high": None, "method": "none"}
    if n < 3:  # Shapiro-Wilk needs 3 values; an interval from fewer would mean nothing
        return out
    if np.ptp(x) == 0:
        out.update(ci_low=float(x[0]), ci_high=float(x[0]), method="constant")
        return out
    w, p = stats.shapiro(x)
    out.update(shapiro_w=float(w), shapiro_p=float(p), normal=bool(p >= normality_alpha))
    if out["normal"]:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
        out.update(ci_low=float(x.mean() - half), ci_high=float(x.mean() + half), method="normal")
    else:
        res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", rng=np.random.default_rng(seed))
        out.update(ci_low=float(res.confidence_interval.low), ci_high=float(res.confidence_interval.high),
                   method="bootstrap")
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def _dice_columns(ci: dict) -> dict:
    return {"dice_mean": ci["mean"], "dice_sd": ci["sd"], "dice_median": ci["median"],
            "dice_shapiro_w": ci["shapiro_w"], "dice_shapiro_p": ci["shapiro_p"], "dice_normal": ci["normal"],
            "dice_ci_low": ci["ci_low"], "dice_ci_high": ci["ci_high"], "ci_method": ci["method"]}


def summarise_structures(case_rows: list[dict], *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                         catalogue: LabelCatalogue | None = None) -> list[dict]:
    """Per structure: n (cases measured), Dice mean / median / normality / 95% CI and method, HD95, ASD."""
    cat = catalogue or load_catalogue()
    out = []
    for sid in sorted({r["id"] for r in case_rows}):
        rows = [r for r in case_rows if r["id"] == sid]
        s = cat.by_id(sid)
        ci = confidence_interval([r["dice"] for r in rows], seed=seed, n_resamples=n_resamples)
        out.append({
            "region": s.region, "structure": s.name, "display": s.display, "id": sid, "n": ci["n"],
            **_dice_columns(ci),
            "n_missed": sum(r["status"] == "missed" for r in rows),
            "n_false_positive": sum(r["status"] == "false positive" for r in rows),
            "n_distance": sum(r["hd95_mm"] is not None for r in rows),
            "hd95_mean_mm": _mean(r["hd95_mm"] for r in rows), "hd95_median_mm": _median(r["hd95_mm"] for r in rows),
            "asd_mean_mm": _mean(r["asd_mm"] for r in rows), "asd_median_mm": _median(r["asd_mm"] for r in rows),
        })
    out.sort(key=lambda r: (REGIONS.index(r["region"]), r["id"]))
    return out


def summarise_regions(case_rows: list[dict], *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict]:
    """Per region and overall (region ``overall``): per-case mean Dice summarised over cases, Table-1 style."""
    groups = [(reg, [r for r in case_rows if r["region"] == reg]) for reg in REGIONS]
    groups = [(reg, rows) for reg, rows in groups if rows] + [("overall", case_rows)]
    out = []
    for reg, rows in groups:
        if not rows:
            continue
        per_case = {}
        for r in rows:
            per_case.setdefault(r["case"], []).append(r["dice"])
        ci = confidence_interval([float(np.mean(v)) for v in per_case.values()], seed=seed, n_resamples=n_resamples)
        out.append({
            "region": reg, "structures": len({r["id"] for r in rows}), "cases": len(per_case),
            "measurements": len(rows), **_dice_columns(ci),
            "hd95_mean_mm": _mean(r["hd95_mm"] for r in rows), "asd_mean_mm": _mean(r["asd_mm"] for r in rows),
        })
    return out


# ------------------------------------------------------------------ the report
@dataclass
class Evaluation:
    """All tables of one evaluation; ``write`` puts them on disk as CSV, Markdown, JSON and a PNG."""

    set_name: str
    cases: list[dict]  # one row per case and structure measured
    structures: list[dict]  # per structure summary
    regions: list[dict]  # per region, then the overall row
    skipped: list[dict]  # {"case", "skipped" ("case" or "<side> label <v>"), "voxels", "reason"}
    settings: dict = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return len({r["case"] for r in self.cases})

    def to_markdown(self) -> str:
        return report_markdown(self)

    def write(self, out_dir: str | Path, figure: bool = True) -> dict[str, Path]:
        from .imageio import save_json, write_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rows in (("cases", self.cases), ("structures", self.structures), ("regions", self.regions),
                           ("skipped", self.skipped)):
            text = _csv_text(rows, header=("case", "skipped", "voxels", "reason"))
            paths[name] = write_atomic(out / f"{name}.csv", lambda tmp, t=text: Path(tmp).write_text(t))
        md = self.to_markdown()
        paths["markdown"] = write_atomic(out / "table1.md", lambda tmp: Path(tmp).write_text(md))
        paths["json"] = save_json({"set_name": self.set_name, "settings": self.settings, "regions": self.regions,
                                   "structures": self.structures, "skipped": self.skipped, "cases": self.cases},
                                  out / "evaluation.json")
        if figure and self.cases:
            paths["figure"] = self.figure(out / "dice_by_region.png")
        return paths

    def figure(self, path: str | Path) -> Path:
        return dice_figure(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """An evaluation written earlier (its ``evaluation.json``, or the folder holding it)."""
        p = Path(path)
        p = p / "evaluation.json" if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
            return cls(set_name=d["set_name"], cases=d["cases"], structures=d["structures"], regions=d["regions"],
                       skipped=d["skipped"], settings=d.get("settings", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"cannot read an earlier evaluation from {p}: {type(e).__name__}: {e}") from e


def _csv_text(rows: list[dict], header: Sequence[str] = ()) -> str:
    buf = io.StringIO()
    fields = list(rows[0].keys()) if rows else list(header)
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _region_title(region: str) -> str:
    return "Overall" if region == "overall" else region.replace("_", " ").capitalize()


def format_ci(mean, lo, hi) -> str:
    """``0.912 (0.890-0.931)``: a mean with its 95% CI, as in the tables."""
    if mean is None:
        return "-"
    if lo is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({lo:.3f}-{hi:.3f})"


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def skipped_summary(skipped: list[dict], show: int = 5) -> list[str]:
    """One line per skipped case, one per label value left out (with the cases it was in)."""
    lines = [k["reason"] if k["reason"].startswith(f"{k['case']}: ") else f"{k['case']}: {k['reason']}"
             for k in skipped if k["skipped"] == "case"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for k in skipped:
        if k["skipped"] != "case":
            groups.setdefault((k["skipped"], k["reason"]), []).append(k)
    for (_, reason), ks in groups.items():
        cases = ", ".join(k["case"] for k in ks[:show]) + (", ..." if len(ks) > show else "")
        voxels = sum(k.get("voxels") or 0 for k in ks)
        lines.append(f"{reason} ({len(ks)} case{'s' if len(ks) > 1 else ''}: {cases}; {voxels} voxels)")
    return lines


def report_markdown(ev: Evaluation) -> str:
    """The paper's Table 1 (Dice by region, overall), then per structure by region, then what was skipped."""
    s = ev.settings
    lines = [f"# MRAnnotator evaluation: {ev.set_name}", ""]
    if s.get("description"):
        lines += [s["description"], ""]
    lines += [f"{ev.n_cases} cases evaluated, {len({k['case'] for k in ev.skipped if k['skipped'] == 'case'})} "
              f"skipped; {len(ev.structures)} structures, {len(ev.cases)} structure measurements.", ""]
    lines += ["## Table 1: Dice by anatomic region", "",
              f"| Region | Structures | Cases | Dice, mean (95% CI) {ev.set_name} | Median | CI method | "
              "HD95 (mm) | ASD (mm) |",
              "|---|---:|---:|---|---:|---|---:|---:|"]
    for r in ev.regions:
        name = _region_title(r["region"])
        if r["region"] == "overall":
            name = "**Overall**"
        lines.append(f"| {name} | {r['structures']} | {r['cases']} | "
                     f"{format_ci(r['dice_mean'], r['dice_ci_low'], r['dice_ci_high'])} | {_f(r['dice_median'])} | "
                     f"{r['ci_method']} | {_f(r['hd95_mean_mm'], '.1f')} | {_f(r['asd_mean_mm'], '.2f')} |")
    lines += ["", "Region and overall rows: per case, the mean Dice of the region's structures measured in that case; "
              "then the mean over cases with its 95% CI (cases are the independent units).", ""]
    lines += ["## Dice per structure", ""]
    for reg in REGIONS:
        rows = [r for r in ev.structures if r["region"] == reg]
        if not rows:
            continue
        lines += [f"### {_region_title(reg)}", "",
                  "| Structure | n | Dice, mean (95% CI) | Median | Shapiro-Wilk p | CI method | Missed | False pos. "
                  "| HD95 (mm) | ASD (mm) |",
                  "|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            dice = format_ci(r["dice_mean"], r["dice_ci_low"], r["dice_ci_high"])
            lines.append(f"| {r['display']} | {r['n']} | {dice}"
                         f" | {_f(r['dice_median'])} | {_f(r['dice_shapiro_p'], '.3g')} | {r['ci_method']} | "
                         f"{r['n_missed']} | {r['n_false_positive']} | {_f(r['hd95_mean_mm'], '.1f')} | "
                         f"{_f(r['asd_mean_mm'], '.2f')} |")
        lines.append("")
    lines += ["n: cases the structure was measured on (present in the truth or the prediction; a structure absent "
              "from both is left out of that case). Missed / false positive: present on one side only (Dice 0, no "
              "surface distance). HD95: 95th-percentile symmetric Hausdorff distance; ASD: average symmetric "
              "surface distance; both in mm on each case's voxel grid, means over the cases where both sides "
              "have the structure.", "",
              f"95% CI of the mean Dice: Shapiro-Wilk test (alpha {s.get('normality_alpha', NORMALITY_ALPHA)}); "
              "normal -> t interval (\"normal\"), otherwise percentile bootstrap of the mean with "
              f"{s.get('bootstrap_resamples', BOOTSTRAP_RESAMPLES)} resamples, seed {s.get('seed', 0)} "
              "(\"bootstrap\"); \"constant\": all values equal; \"none\": fewer than 3 values.", ""]
    lines += ["## Skipped", ""]
    if ev.skipped:
        lines += [f"- {line}" for line in skipped_summary(ev.skipped)]
    else:
        lines.append("Nothing: every case had its pair, matching grids and known label values.")
    lines.append("")
    if s:
        lines += ["## Settings", ""]
        lines += [f"- {k}: {v}" for k, v in s.items() if k != "description"]
        lines.append("")
    return "\n".join(lines)


def comparison_markdown(evaluations: Sequence[Evaluation]) -> str:
    """Table 1 with one Dice column per evaluation (e.g. internal vs external set, original vs fine-tuned)."""
    evs = list(evaluations)
    head = "| | " + " | ".join(f"{e.set_name}: Dice (95% CI), n" for e in evs) + " |"
    rule = "|---|" + "---|" * len(evs)

    def cell(row, key):
        return "-" if row is None else f"{format_ci(row['dice_mean'], row['dice_ci_low'], row['dice_ci_high'])}, " \
                                       f"{row[key]}"

    regions = [r for r in (*REGIONS, "overall") if any(x["region"] == r for e in evs for x in e.regions)]
    lines = ["# MRAnnotator evaluation: " + " vs ".join(e.set_name for e in evs), "",
             "## Table 1: Dice by anatomic region (n = cases)", "", head.replace("| |", "| Region |", 1), rule]
    for reg in regions:
        rows = [next((x for x in e.regions if x["region"] == reg), None) for e in evs]
        lines.append(f"| {_region_title(reg)} | " + " | ".join(cell(r, "cases") for r in rows) + " |")
    lines += ["", "## Dice per structure (n = cases measured)", "", head.replace("| |", "| Structure |", 1), rule]
    ids = sorted({x["id"] for e in evs for x in e.structures},
                 key=lambda i: (REGIONS.index(load_catalogue().by_id(i).region), i))
    for sid in ids:
        rows = [next((x for x in e.structures if x["id"] == sid), None) for e in evs]
        lines.append(f"| {load_catalogue().by_id(sid).display} | " + " | ".join(cell(r, "n") for r in rows) + " |")
    lines += ["", "Each column as in its own report (table1.md): CI method per row there.", ""]
    return "\n".join(lines)


def dice_figure(ev: Evaluation, path: str | Path) -> Path:
    """Horizontal box plots (cases as dots) of Dice per structure, one panel per region, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .imageio import write_atomic

    cat = load_catalogue()
    regions = [reg for reg in REGIONS if any(r["region"] == reg for r in ev.structures)]
    heights = [sum(r["region"] == reg for r in ev.structures) + 1.2 for reg in regions]
    fig, axes = plt.subplots(len(regions), 1, figsize=(7.0, 0.26 * sum(heights) + 0.9), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, reg in zip(axes[:, 0], regions, strict=True):
        rows = [r for r in ev.structures if r["region"] == reg][::-1]  # first structure on top
        data = [[c["dice"] for c in ev.cases if c["id"] == r["id"]] for r in rows]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=False, medianprops={"color": "black"})
        for k, (vals, r) in enumerate(zip(data, rows, strict=True), start=1):
            color = [c / 255 for c in cat.by_id(r["id"]).color]
            ax.scatter(vals, k + rng.uniform(-0.15, 0.15, len(vals)), s=9, color=color, edgecolor="black",
                       linewidth=0.3, zorder=3)
        ax.set_yticks(range(1, len(rows) + 1), [f"{r['display']} (n={r['n']})" for r in rows], fontsize=7)
        ax.set_title(_region_title(reg), fontsize=8, loc="left")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("Dice")
    fig.suptitle(f"Dice per structure - {ev.set_name} ({ev.n_cases} cases)", fontsize=10)
    fig.tight_layout()
    out = write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


# ------------------------------------------------------------------ many cases
def _case_name(path: Path) -> str:
    for ext in IMAGE_SUFFIXES:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.name


def _images_in(folder: Path, what: str) -> dict[str, Path]:
    if not folder.exists():
        raise InputError(f"{what} folder not found: {folder}")
    if folder.is_file():
        return {_case_name(folder): folder}
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith("."):
            found[_case_name(p)] = p
    if not found:
        raise InputError(f"no label maps ({', '.join(IMAGE_SUFFIXES)}) in the {what} folder {folder}")
    return found


def pair_cases(pred_dir: str | Path, truth_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[dict]]:
    """(case, prediction, truth) by file name, and the unpaired files as skipped entries.

    A prediction named ``<case>_seg`` (what ``mrannotator segment`` writes) pairs with truth ``<case>``.
    Two single files are one pair whatever their names.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    preds, truths = _images_in(pred_dir, "prediction"), _images_in(truth_dir, "truth")
    if pred_dir.is_file() and truth_dir.is_file():
        return [(_case_name(truth_dir), pred_dir, truth_dir)], []
    pairs, used, skipped = [], set(), []
    for case, t in truths.items():
        key = case if case in preds else f"{case}_seg" if f"{case}_seg" in preds else None
        if key is None:
            reason = (f"no prediction for the truth {t.name} in {pred_dir} (predictions pair by file name: "
                      f"{case}.nii.gz or {case}_seg.nii.gz)")
            skipped.append({"case": case, "skipped": "case", "voxels": None, "reason": reason})
            continue
        used.add(key)
        pairs.append((case, preds[key], t))
    for key, p in preds.items():
        if key not in used:
            reason = f"no truth for the prediction {p.name} in {truth_dir}"
            skipped.append({"case": key, "skipped": "case", "voxels": None, "reason": reason})
    return pairs, skipped


def evaluate_pairs(pairs: Iterable[tuple[str, object, object]], *, set_name: str = "test",
                   truth_labels: LabelMap | str | Path | None = None, pred_labels: LabelMap | str | Path | None = None,
                   structures: Iterable[str | int] | None = None, seed: int = 0,
                   n_resamples: int = BOOTSTRAP_RESAMPLES, skipped: list[dict] | None = None,
                   description: str = "", progress=None) -> Evaluation:
    """Evaluate (case, prediction, truth) triples (paths or nibabel images holding label maps)."""
    cat = load_catalogue()
    tmap = load_label_map(truth_labels, cat) if isinstance(truth_labels, (str, Path)) else truth_labels
    pmap = load_label_map(pred_labels, cat) if isinstance(pred_labels, (str, Path)) else pred_labels
    ids = None
    if structures is not None:
        ids = set()
        for s in structures:
            ids.add(cat.by_id(int(s)).id if isinstance(s, int) or str(s).isdigit() else _target(s, "--structures",
                                                                                                   cat))
    skipped = list(skipped or [])
    rows = []
    for case, pred, truth in pairs:
        if progress:
            progress(f"{case}: measuring")
        try:
            case_rows, notes = evaluate_case(pred, truth, truth_labels=tmap, pred_labels=pmap, structures=ids,
                                             case=case, catalogue=cat)
        except InputError as e:
            skipped.append({"case": case, "skipped": "case", "voxels": None, "reason": str(e)})
            continue
        rows += case_rows
        skipped += notes
    if not rows:
        reasons = "; ".join(f"{k['case']}: {k['reason']}" for k in skipped[:5]) or "no pairs given"
        raise InputError(f"nothing to evaluate: no case gave a measurement ({reasons})")
    settings = {
        "truth_labels": tmap.source if tmap else "catalogue ids",
        "pred_labels": pmap.source if pmap else "catalogue ids",
        "structures": "all present" if ids is None else ", ".join(cat.by_id(i).name for i in sorted(ids)),
        "metrics": "MONAI compute_dice, compute_hausdorff_distance(percentile=95), "
                   "compute_average_surface_distance(symmetric=True), spacing from each truth's affine",
        "normality_alpha": NORMALITY_ALPHA, "bootstrap_resamples": n_resamples, "seed": seed,
    }
    if description:
        settings["description"] = description
    return Evaluation(set_name=set_name, cases=rows,
                      structures=summarise_structures(rows, seed=seed, n_resamples=n_resamples, catalogue=cat),
                      regions=summarise_regions(rows, seed=seed, n_resamples=n_resamples), skipped=skipped,
                      settings=settings)


def evaluate(pred_dir: str | Path, truth_dir: str | Path, *, truth_labels: LabelMap | str | Path | None = None,
             pred_labels: LabelMap | str | Path | None = None, structures: Iterable[str | int] | None = None,
             set_name: str = "test", seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
             progress=None) -> Evaluation:
    """Evaluate every prediction in ``pred_dir`` against the truth of the same file name in ``truth_dir``."""
    pairs, skipped = pair_cases(pred_dir, truth_dir)
    return evaluate_pairs(pairs, set_name=set_name, truth_labels=truth_labels, pred_labels=pred_labels,
                          structures=structures, seed=seed, n_resamples=n_resamples, skipped=skipped,
                          progress=progress)


# ------------------------------------------------------------------ command line
def cmd_evaluate(args) -> int:
    import sys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's empty-mask warnings; empty sides are handled and reported
        ev = evaluate(args.pred, args.truth, truth_labels=args.truth_labels, pred_labels=args.pred_labels,
                      structures=args.structures, set_name=args.set_name, seed=args.seed)
        paths = ev.write(args.out, figure=not args.no_figure)
        if args.compare:
            from .imageio import write_atomic

            text = comparison_markdown([*(Evaluation.load(p) for p in args.compare), ev])
            paths["comparison"] = write_atomic(Path(args.out) / "comparison.md", lambda tmp: Path(tmp).write_text(text))
    print(f"{'region':<16s} {'structures':>10s} {'cases':>6s}  Dice mean (95% CI)")
    for r in ev.regions:
        print(f"{_region_title(r['region']):<16s} {r['structures']:>10d} {r['cases']:>6d}  "
              f"{format_ci(r['dice_mean'], r['dice_ci_low'], r['dice_ci_high'])} [{r['ci_method']}]")
    for line in skipped_summary(ev.skipped):
        print(f"mrannotator: skipped {line}", file=sys.stderr)
    print(f"{ev.n_cases} cases evaluated; report: {paths['markdown']}; tables: "
          f"{', '.join(str(paths[k]) for k in ('cases', 'structures', 'regions'))}"
          + (f"; figure: {paths['figure']}" if "figure" in paths else "")
          + (f"; comparison: {paths['comparison']}" if "comparison" in paths else ""))
    return 0


def add_cli(subparsers) -> None:
    """Register ``mrannotator evaluate`` on the CLI's subparsers."""
    e = subparsers.add_parser("evaluate", help="Dice / HD95 / ASD of predictions against truth, paper-style tables")
    e.add_argument("--pred", required=True, help="folder of predicted label maps (or one file)")
    e.add_argument("--truth", required=True, help="folder of reference label maps, same file names (or one file)")
    e.add_argument("--truth-labels", default=None,
                   help="label map of the truth files: CSV/JSON value -> catalogue structure, an nnU-Net dataset.json, "
                        f"or a built-in name ({', '.join(BUILTIN_LABEL_MAPS)}); default: catalogue ids")
    e.add_argument("--pred-labels", default=None, help="label map of the prediction files (as --truth-labels)")
    e.add_argument("--structures", nargs="+", default=None, help="only these structures (catalogue names or ids)")
    e.add_argument("--out", default="mrannotator-evaluation", help="output folder (CSV, Markdown, JSON, PNG)")
    e.add_argument("--set-name", default="test", help="name of the test set in the report, e.g. internal, external")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    e.add_argument("--no-figure", action="store_true", help="do not draw the Dice figure")
    e.add_argument("--compare", nargs="+", default=None, metavar="EARLIER",
                   help="earlier evaluation folders (or their evaluation.json): also write comparison.md with one "
                        "Dice column per set, e.g. the original model next to a fine-tuned one")
    e.set_defaults(func=cmd_evaluate)
