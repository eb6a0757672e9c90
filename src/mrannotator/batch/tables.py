"""The cohort outputs of a batch: ``cohort.parquet`` / ``cohort.csv``, ``failures.csv`` and ``cohort.png``.

Everything here is built from ledger records (and the inputs the scan refused), sorted by case and
structure id, so an interrupted-and-resumed batch writes the same tables as an uninterrupted one (the
measured ``seconds`` and the ``node`` a case ran on aside).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..imageio import write_atomic
from .inputs import COHORT_FIELDS, Skip

COHORT_COLUMNS = ("case", "path", "structure", "id", "voxels", "volume_ml", "mean_intensity", "weights", "mode",
                  "seconds", "regions", "node", *COHORT_FIELDS)
FAILURE_COLUMNS = ("case", "path", "error")
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
        base = {"case": rec["case"], "path": rec["path"], "weights": rec["weights"], "mode": rec["mode"],
                "seconds": rec["seconds"], "regions": rec["regions"], "node": rec.get("node", "")}
        for s in sorted(rec.get("rows", []), key=lambda s: s["id"]):
            rows.append({**base, **s, **{k: header.get(k, "") for k in COHORT_FIELDS}})
    frame = pd.DataFrame(rows, columns=list(COHORT_COLUMNS))
    frame["MagneticFieldStrength"] = pd.to_numeric(frame["MagneticFieldStrength"].replace("", np.nan))
    return frame.astype({"id": "int64", "voxels": "int64", "volume_ml": "float64", "mean_intensity": "float64",
                         "seconds": "float64"})


def failures_frame(records: Iterable[dict], skipped: Iterable[Skip]):
    import pandas as pd

    rows = [{"case": r["case"], "path": r["path"], "error": r.get("error", "")}
            for r in records if r.get("status") != "done"]
    rows += [{"case": s.case, "path": s.path, "error": s.error} for s in skipped]
    return pd.DataFrame(sorted(rows, key=lambda r: (r["case"], r["path"])), columns=list(FAILURE_COLUMNS))


def age_in_years(value: str) -> float:
    """DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``) in years; NaN when absent or malformed."""
    m = _AGE.match(str(value or ""))
    return float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()] if m else float("nan")


def write_tables(out_dir: Path, records: list[dict], skipped: list[Skip], figure: bool = True) -> dict[str, Path]:
    """cohort.parquet, cohort.csv, failures.csv (and cohort.png), each written atomically."""
    cohort = cohort_frame(records)
    failures = failures_frame(records, skipped)
    out = Path(out_dir)
    paths = {
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
