"""Statistics over cases: Shapiro-Wilk, t or bootstrap 95% intervals, per-structure and per-region summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..catalogue import REGIONS, LabelCatalogue, load_catalogue

NORMALITY_ALPHA = 0.05


BOOTSTRAP_RESAMPLES = 1000


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
