"""The cohort outputs of a batch: ``cases.parquet`` / ``cases.csv`` (one row per input case), ``cohort.parquet``
/ ``cohort.csv`` (one row per case and structure found), ``failures.csv`` and ``cohort.png``.

Everything here is built from ledger records (and the inputs the scan refused), sorted by case and
structure id, so an interrupted-and-resumed batch writes the same tables as an uninterrupted one (the
measured ``seconds`` and the ``node`` a case ran on aside). A case's ``status``: ``done`` (structures found),
``empty`` (segmented, nothing found), ``refused`` (the input itself: not MR, corrupt, not a 3D stack, a
missing manifest path...) or ``failed`` (an error while segmenting; tried again by the next run). A private case
(see :mod:`.naming`) has an empty ``path`` in every public table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..imageio import write_atomic
from .inputs import COHORT_FIELDS, Skip
from .ledger import FINAL_FAILURE

CASE_COLUMNS = ("case", "path", "status", "error", "structures", "seconds", "node", "regions", "kind",
                "series_number", "description")
COHORT_COLUMNS = ("case", "path", "structure", "id", "voxels", "volume_ml", "mean_intensity", "weights", "mode",
                  "seconds", "regions", "node", *COHORT_FIELDS)
FAILURE_COLUMNS = ("case", "path", "status", "series_number", "description", "error")
_AGE = re.compile(r"^\s*(\d+)\s*([DWMY]?)\s*$", re.I)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def cohort_frame(records: Iterable[dict]):
    """One row per case and structure found (cases in name order, structures in catalogue id order)."""
    import pandas as pd

    rows = []
    for rec in sorted(records, key=lambda r: r["case"]):
        if rec.get("status") != "done":
            continue
        header = rec.get("header") or {}
        base = {"case": rec["case"], "path": public_path(rec), "weights": rec["weights"], "mode": rec["mode"],
                "seconds": rec["seconds"], "regions": rec["regions"], "node": rec.get("node", "")}
        for s in sorted(rec.get("rows", []), key=lambda s: s["id"]):
            rows.append({**base, **s, **{k: header.get(k, "") for k in COHORT_FIELDS}})
    frame = pd.DataFrame(rows, columns=list(COHORT_COLUMNS))
    frame["MagneticFieldStrength"] = pd.to_numeric(frame["MagneticFieldStrength"].replace("", np.nan))
    return frame.astype({"id": "int64", "voxels": "int64", "volume_ml": "float64", "mean_intensity": "float64",
                         "seconds": "float64"})


def public_path(rec: dict) -> str:
    return "" if rec.get("private") else rec.get("path", "")


def case_status(rec: dict) -> str:
    if rec.get("status") == "done":
        return "done" if rec.get("rows") else "empty"
    return "refused" if rec.get("failure") == FINAL_FAILURE else "failed"


def case_rows(records: Iterable[dict], skipped: Iterable[Skip]) -> list[dict]:
    """One row per input case: every ledger record and every input the plan refused, by case name."""
    rows = []
    for rec in records:
        header = rec.get("header") or {}
        rows.append({"case": rec["case"], "path": public_path(rec), "status": case_status(rec),
                     "error": rec.get("error", "") if rec.get("status") != "done" else "",
                     "structures": len(rec.get("rows") or []), "seconds": float(rec.get("seconds") or 0.0),
                     "node": rec.get("node", ""), "regions": rec.get("regions", ""), "kind": rec.get("kind", ""),
                     "series_number": str(rec.get("series_number", "") or ""),
                     "description": header.get("SeriesDescription", "")})
    for s in skipped:
        rows.append({"case": s.case, "path": "" if s.private else s.path, "status": "refused", "error": s.error,
                     "structures": 0, "seconds": 0.0, "node": "", "regions": "", "kind": "",
                     "series_number": s.series_number, "description": s.description})
    return sorted(rows, key=lambda r: r["case"])


def cases_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=list(CASE_COLUMNS)).astype({"structures": "int64", "seconds": "float64"})


def failures_frame(rows: list[dict]):
    """The refused and failed rows of the cases table (what to look at), with the series number and description
    of a refused series."""
    import pandas as pd

    bad = [{k: r[k] for k in FAILURE_COLUMNS} for r in rows if r["status"] in ("refused", "failed")]
    return pd.DataFrame(bad, columns=list(FAILURE_COLUMNS))


def age_in_years(value: str) -> float:
    """DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``) in years; NaN when absent or malformed."""
    m = _AGE.match(str(value or ""))
    return float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()] if m else float("nan")


def write_tables(out_dir: Path, records: list[dict], skipped: list[Skip], figure: bool = True) -> dict[str, Path]:
    """cases.parquet / .csv, cohort.parquet / .csv, failures.csv (and cohort.png), each written atomically."""
    cohort = cohort_frame(records)
    rows = case_rows(records, skipped)
    cases = cases_frame(rows)
    failures = failures_frame(rows)
    out = Path(out_dir)
    paths = {
        "cases_parquet": write_atomic(out / "cases.parquet", lambda tmp: cases.to_parquet(tmp, index=False)),
        "cases": write_atomic(out / "cases.csv", lambda tmp: cases.to_csv(tmp, index=False)),
        "parquet": write_atomic(out / "cohort.parquet", lambda tmp: cohort.to_parquet(tmp, index=False)),
        "csv": write_atomic(out / "cohort.csv", lambda tmp: cohort.to_csv(tmp, index=False)),
        "failures": write_atomic(out / "failures.csv", lambda tmp: failures.to_csv(tmp, index=False)),
    }
    if figure:
        paths["figure"] = write_cohort_figure(cohort, out / "cohort.png")
    return paths


def write_cohort_figure(cohort, path: Path) -> Path:
    """Per-structure volume distributions (left) and volume against age where ages are known (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..catalogue import load_catalogue

    known = {s.id: s for s in load_catalogue()}
    ids = sorted(cohort["id"].unique().tolist())
    colours = {i: np.asarray(known[i].color) / 255.0 if i in known else (0.5, 0.5, 0.5) for i in ids}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.28 * len(ids) + 1.5)), dpi=80,
                                      gridspec_kw={"width_ratios": [3, 2]})
    _volume_boxes(left, cohort, ids, colours)
    _volume_by_age(right, cohort, ids, colours)
    fig.suptitle(f"{cohort['case'].nunique()} cases, {len(ids)} structures", fontsize=11)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def _volume_boxes(ax, cohort, ids, colours) -> None:
    if not ids:
        ax.text(0.5, 0.5, "no structure found in any case", ha="center", va="center")
        return
    data = [cohort.loc[cohort["id"] == i, "volume_ml"].to_numpy() for i in ids]
    names = [cohort.loc[cohort["id"] == i, "structure"].iloc[0] for i in ids]
    box = ax.boxplot(data, orientation="horizontal", patch_artist=True, widths=0.6)
    for row, (patch, i, d) in enumerate(zip(box["boxes"], ids, data, strict=True), start=1):
        patch.set_facecolor(colours[i])
        ax.scatter(d, np.full(len(d), row) + np.linspace(-0.2, 0.2, len(d)), s=6, color="black", zorder=3)
    ax.set_yticks(range(1, len(ids) + 1), [f"{n} (n={len(d)})" for n, d in zip(names, data, strict=True)],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("volume (ml, log scale)")
    ax.set_title("volume per structure", fontsize=10)


def _volume_by_age(ax, cohort, ids, colours) -> None:
    ages = cohort["PatientAge"].map(age_in_years)
    known = cohort[ages.notna()].assign(age=ages[ages.notna()])
    ax.set_title("volume against age", fontsize=10)
    if known.empty:
        ax.text(0.5, 0.5, "no PatientAge in the inputs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    # the structures seen in most aged cases (at most 8 keep the legend readable)
    top = known.groupby("id")["case"].nunique().sort_values(ascending=False).index[:8]
    for i in top:
        part = known[known["id"] == i]
        ax.scatter(part["age"], part["volume_ml"], s=14, color=colours[i], label=part["structure"].iloc[0])
    ax.set_xlabel("age (years)")
    ax.set_ylabel("volume (ml)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best")


PLAN_COLUMNS = ("case", "path", "kind", "status", "regions", "routed_by", "files", "series_number", "error")


def write_plan(out_dir: Path, plan) -> Path:
    """``OUT/plan.csv`` (``--dry-run``): every input case, ``planned`` or ``refused`` with the reason."""
    import pandas as pd

    rows = [{"case": c.name, "path": "" if c.private else c.path, "kind": c.kind, "status": "planned",
             "regions": c.route.label, "routed_by": c.route.reason, "files": len(c.files),
             "series_number": c.series_number, "error": ""} for c in plan.cases]
    rows += [{"case": s.case, "path": "" if s.private else s.path, "kind": "", "status": "refused", "regions": "",
              "routed_by": "", "files": 0, "series_number": s.series_number, "error": s.error} for s in plan.skipped]
    frame = pd.DataFrame(sorted(rows, key=lambda r: r["case"]), columns=list(PLAN_COLUMNS))
    return write_atomic(Path(out_dir) / "plan.csv", lambda tmp: frame.to_csv(tmp, index=False))
