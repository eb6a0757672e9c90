"""The report of one evaluation: CSV tables, the paper's Table 1 in Markdown, JSON, a Dice figure; comparisons."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalogue import REGIONS, load_catalogue
from ..errors import InputError
from .statistics import BOOTSTRAP_RESAMPLES, NORMALITY_ALPHA


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
        from ..imageio import save_json, write_atomic

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


def region_title(region: str) -> str:
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
        name = region_title(r["region"])
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
        lines += [f"### {region_title(reg)}", "",
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
        lines.append(f"| {region_title(reg)} | " + " | ".join(cell(r, "cases") for r in rows) + " |")
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

    from ..imageio import write_atomic

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
        ax.set_title(region_title(reg), fontsize=8, loc="left")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("Dice")
    fig.suptitle(f"Dice per structure - {ev.set_name} ({ev.n_cases} cases)", fontsize=10)
    fig.tight_layout()
    out = write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out
