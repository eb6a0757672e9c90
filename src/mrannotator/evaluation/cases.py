"""Many cases: pair predictions with their truth by file name, measure each pair, summarise."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..catalogue import load_catalogue
from ..errors import InputError
from ..imageio import IMAGE_SUFFIXES, case_name
from .labelmaps import LabelMap, load_label_map, structure_id
from .metrics import evaluate_case
from .reports import Evaluation
from .statistics import BOOTSTRAP_RESAMPLES, NORMALITY_ALPHA, summarise_regions, summarise_structures


def _images_in(folder: Path, what: str) -> dict[str, Path]:
    if not folder.exists():
        raise InputError(f"{what} folder not found: {folder}")
    if folder.is_file():
        return {case_name(folder): folder}
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith("."):
            found[case_name(p)] = p
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
        return [(case_name(truth_dir), pred_dir, truth_dir)], []
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
            ids.add(cat.by_id(int(s)).id if isinstance(s, int) or str(s).isdigit() else structure_id(s, "--structures",
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
