"""Evaluation like the paper: Dice / HD95 / ASD per case and structure, CIs, region tables, bad inputs.

Metrics are checked against a direct computation written here with scipy's exact distance transform
(not MONAI): surface voxels are the voxels of a mask that a 6-connected erosion removes (the volume
border counts as outside), HD95 is the larger of the two directed 95th percentiles and ASD the mean
of both directions' surface distances, all in mm on the case's voxel spacing.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrannotator import load_catalogue
from mrannotator.cli import main as cli_main
from mrannotator.errors import InputError
from mrannotator.evaluation import (
    Evaluation,
    comparison_markdown,
    confidence_interval,
    evaluate,
    evaluate_case,
    evaluate_pairs,
    load_label_map,
)
from mrannotator.phantoms import make_phantom

CAT = load_catalogue()
ID = {s.name: s.id for s in CAT}


# ------------------------------------------------------------------ independent reference
def direct_metrics(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float | None, float | None]:
    p, t = np.pad(pred, 1), np.pad(truth, 1)  # outside the volume is background
    dice = 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
    if not p.any() or not t.any():
        return dice, None, None
    edge_p = p & ~ndimage.binary_erosion(p)
    edge_t = t & ~ndimage.binary_erosion(t)
    d_pt = ndimage.distance_transform_edt(~edge_t, sampling=spacing)[edge_p]
    d_tp = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_t]
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return dice, float(hd95), float(np.concatenate([d_pt, d_tp]).mean())


def spacing_of(img) -> np.ndarray:
    return np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)


def image(data, like) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data, np.uint8), like.affine)


def moved(labels: np.ndarray, sid: int, shift: int, axis: int) -> np.ndarray:
    """``labels`` with structure ``sid`` shifted by ``shift`` voxels along ``axis`` (painted over the rest)."""
    out = labels.copy()
    mask = labels == sid
    out[mask] = 0
    out[np.roll(mask, shift, axis=axis)] = sid
    return out


@pytest.fixture(scope="module")
def abdomen():
    """Anisotropic (3.5 x 3.5 x 6 mm) phantom stored coronal, so array axes are not R-A-S."""
    return make_phantom("abdomen", seed=20001, orientation="coronal")


def check_rows_against_direct(rows, pred, truth, spacing):
    for r in rows:
        dice, hd95, asd = direct_metrics(pred == r["id"], truth == r["id"], spacing)
        assert r["dice"] == pytest.approx(dice, abs=1e-6), r["structure"]
        if hd95 is None:
            assert r["hd95_mm"] is None and r["asd_mm"] is None
        else:
            assert r["hd95_mm"] == pytest.approx(hd95, rel=1e-5, abs=1e-5), r["structure"]
            assert r["asd_mm"] == pytest.approx(asd, rel=1e-5, abs=1e-5), r["structure"]


# ------------------------------------------------------------------ known perturbations
@pytest.mark.parametrize(("axis", "k"), [(0, 2), (1, -3), (2, 1)])
def test_shifted_structure_equals_direct_computation(abdomen, axis, k):
    truth = np.asarray(abdomen.labels.dataobj)
    pred = moved(truth, ID["kidney_left"], k, axis)
    rows, notes = evaluate_case(image(pred, abdomen.labels), abdomen.labels, case="shifted")
    assert notes == []
    by_name = {r["structure"]: r for r in rows}
    assert set(by_name) == set(abdomen.structures.values())
    spacing = spacing_of(abdomen.labels)
    check_rows_against_direct(rows, pred, truth, spacing)
    kid = by_name["kidney_left"]
    assert 0 < kid["dice"] < 1 and kid["hd95_mm"] > 0 and kid["status"] == "measured"
    # the whole structure moved by |k| voxels: no surface point is farther than |k| * spacing from the other
    assert kid["hd95_mm"] <= abs(k) * spacing[axis] + 1e-4
    assert by_name["liver"]["dice"] == 1.0 and by_name["liver"]["hd95_mm"] == 0.0


def test_removed_and_added_structures(abdomen):
    truth = np.asarray(abdomen.labels.dataobj)
    pred = truth.copy()
    pred[pred == ID["gallbladder"]] = 0  # removed
    box = tuple(slice(2, 6) for _ in range(3))
    assert not truth[box].any()
    pred[box] = ID["patella"]  # added: a structure the truth does not have
    rows, _ = evaluate_case(image(pred, abdomen.labels), abdomen.labels, case="c")
    by_name = {r["structure"]: r for r in rows}
    check_rows_against_direct(rows, pred, truth, spacing_of(abdomen.labels))
    assert (by_name["gallbladder"]["dice"], by_name["gallbladder"]["status"]) == (0.0, "missed")
    assert (by_name["patella"]["dice"], by_name["patella"]["status"]) == (0.0, "false positive")
    assert by_name["patella"]["pred_voxels"] == 64 and by_name["patella"]["truth_voxels"] == 0
    assert by_name["gallbladder"]["hd95_mm"] is None and by_name["patella"]["asd_mm"] is None
    # absent from both sides: not measured at all
    assert "femur" not in by_name and "vertebrae_L1" not in by_name


def test_structure_counts_and_tables(abdomen):
    """n per structure counts only the cases where it is on either side; regions average per case."""
    truth = np.asarray(abdomen.labels.dataobj)
    no_gb = truth.copy()
    no_gb[no_gb == ID["gallbladder"]] = 0  # absent from both prediction and truth in case 2
    pairs = [("c1", image(truth, abdomen.labels), abdomen.labels),
             ("c2", image(moved(no_gb, ID["spleen"], 1, 0), abdomen.labels), image(no_gb, abdomen.labels)),
             ("c3", image(moved(truth, ID["liver"], 2, 1), abdomen.labels), abdomen.labels)]
    ev = evaluate_pairs(pairs, set_name="phantoms")
    n = {s["structure"]: s["n"] for s in ev.structures}
    assert n["gallbladder"] == 2 and n["spleen"] == 3
    assert {r["region"] for r in ev.regions} == {"abdomen", "overall"}
    abd = ev.regions[0]
    per_case = [np.mean([r["dice"] for r in ev.cases if r["case"] == c]) for c in ("c1", "c2", "c3")]
    assert abd["cases"] == 3 and abd["dice_mean"] == pytest.approx(np.mean(per_case))
    spl = next(s for s in ev.structures if s["structure"] == "spleen")
    assert spl["dice_mean"] == pytest.approx(np.mean([r["dice"] for r in ev.cases if r["structure"] == "spleen"]))
    md = ev.to_markdown()
    assert "Table 1" in md and "| Gallbladder | 2 |" in md and "| Spleen | 3 |" in md


def test_compare_with_an_earlier_evaluation(tmp_path, abdomen):
    """Original vs 'fine-tuned': written, read back, and put side by side in one table."""
    truth = np.asarray(abdomen.labels.dataobj)
    original = evaluate_pairs([("c1", image(moved(truth, ID["liver"], 3, 0), abdomen.labels), abdomen.labels)],
                              set_name="original")
    original.write(tmp_path / "orig", figure=False)
    back = Evaluation.load(tmp_path / "orig")
    assert (back.regions, back.structures, back.cases) == (original.regions, original.structures, original.cases)
    tuned = evaluate_pairs([("c1", image(moved(truth, ID["liver"], 1, 0), abdomen.labels), abdomen.labels)],
                           set_name="fine-tuned")
    md = comparison_markdown([back, tuned])
    liver = [r["dice_mean"] for e in (original, tuned) for r in e.structures if r["structure"] == "liver"]
    assert liver[0] < liver[1]
    assert "original vs fine-tuned" in md and f"| Liver | {liver[0]:.3f}, 1 | {liver[1]:.3f}, 1 |" in md
    with pytest.raises(InputError, match="cannot read an earlier evaluation"):
        Evaluation.load(tmp_path / "nowhere")


# ------------------------------------------------------------------ confidence intervals
def test_ci_normal_sample_gets_t_interval():
    # Five evenly spaced Dice values: mean 0.84, sample SD sqrt(0.004 / 4) = 0.0316228 (by hand), Shapiro-Wilk
    # finds nothing against normality. t(0.975, df=4) = 2.7764 (any t table), so the half-width is
    # 2.7764 * 0.0316228 / sqrt(5) = 0.039265 and the interval is 0.800735 .. 0.879265.
    x = [0.80, 0.82, 0.84, 0.86, 0.88]
    ci = confidence_interval(x)
    assert ci["method"] == "normal" and ci["normal"] is True
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(0.84) and ci["median"] == pytest.approx(0.84)
    assert ci["sd"] == pytest.approx(0.0316228, abs=1e-7)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((0.800735, 0.879265), abs=2e-6)


def test_ci_skewed_sample_gets_seeded_bootstrap():
    # 20 successes (Dice 1) and 5 failures (Dice 0) of 25 cases: far from normal. The bootstrap mean of such a
    # sample is Binomial(25, 0.8) / 25 exactly; from the binomial table P(X <= 14) = 0.017, P(X <= 15) = 0.047,
    # P(X <= 23) = 0.973, P(X <= 24) = 0.996, so the true 2.5 % and 97.5 % points are 15/25 = 0.60 and
    # 24/25 = 0.96. 1,000 seeded resamples may land one step (0.04) either side.
    x = [1.0] * 20 + [0.0] * 5
    ci = confidence_interval(x, seed=3)
    assert ci["method"] == "bootstrap" and ci["normal"] is False and ci["shapiro_p"] < 0.05
    assert ci["mean"] == pytest.approx(0.8)
    assert 0.56 - 1e-9 <= ci["ci_low"] <= 0.64 + 1e-9 and 0.92 - 1e-9 <= ci["ci_high"] <= 1.0
    assert ci == confidence_interval(x, seed=3)  # reproducible
    rng = np.random.default_rng(7)
    skewed = np.r_[rng.uniform(0.88, 0.95, 22), 0.0, 0.04, 0.3]  # mostly good, a few failures
    a, b = confidence_interval(skewed, seed=3), confidence_interval(skewed, seed=4)
    assert (a["ci_low"], a["ci_high"]) != (b["ci_low"], b["ci_high"])  # the seed is used
    assert skewed.min() < a["ci_low"] < skewed.mean() < a["ci_high"] < skewed.max()


def test_ci_degenerate_samples():
    assert confidence_interval([0.9, 0.8])["method"] == "none"
    c = confidence_interval([1.0] * 5)
    assert (c["method"], c["ci_low"], c["ci_high"]) == ("constant", 1.0, 1.0)


# ------------------------------------------------------------------ real data, files, CLI
@pytest.fixture(scope="module")
def real_seg(real_mr):
    return real_mr.parent / "example_seg_mr.nii.gz"


def test_total_mr_map_renames_totalsegmentator_labels():
    m = load_label_map("total_mr")
    assert m.ids[1] == ID["spleen"] and m.ids[34] == ID["clavicle_left"] and m.ids[23] == ID["aorta"]
    assert m.ids[36] == m.ids[37] == ID["upper_femora"] and m.ids[38] == ID["pelvis"]
    assert m.ignored[19] == "vertebrae" and 11 in m.ignored


def test_cli_on_real_mr_reports_what_it_skipped(tmp_path, real_seg, capsys):
    ts = nib.load(real_seg)
    ts_data = np.asarray(ts.dataobj).astype(np.uint8)
    ours = load_label_map("total_mr")
    lut = np.zeros(256, np.uint8)
    for v, sid in ours.ids.items():
        lut[v] = sid
    pred = lut[ts_data]
    pred[ndimage.binary_erosion(pred == ID["liver"]) ^ (pred == ID["liver"])] = 0  # liver one voxel thinner
    truth_data = ts_data.copy()
    truth_data[0, 0, :3] = 77  # a value nobody knows
    truth_dir, pred_dir, out = tmp_path / "truth", tmp_path / "pred", tmp_path / "out"
    truth_dir.mkdir(), pred_dir.mkdir()
    nib.save(nib.Nifti1Image(truth_data, ts.affine), truth_dir / "case01.nii.gz")
    # the prediction stored RAS (the truth is LPS): same grid, re-stored losslessly
    ras = nib.as_closest_canonical(nib.Nifti1Image(pred, ts.affine))
    nib.save(ras, pred_dir / "case01_seg.nii.gz")
    nib.save(nib.Nifti1Image(pred, ts.affine), pred_dir / "lonely.nii.gz")  # no truth
    shutil.copy(truth_dir / "case01.nii.gz", truth_dir / "nopred.nii.gz")  # no prediction
    nib.save(nib.Nifti1Image(pred[:, :, :10], ts.affine), pred_dir / "cropped.nii.gz")  # grid mismatch
    nib.save(nib.Nifti1Image(truth_data, ts.affine), truth_dir / "cropped.nii.gz")

    rc = cli_main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--truth-labels", "total_mr",
                   "--out", str(out), "--set-name", "real MR"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("cases.csv", "structures.csv", "regions.csv", "skipped.csv", "table1.md", "evaluation.json",
                 "dice_by_region.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "dice_by_region.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "evaluation.json").read_text())
    rows = {r["structure"]: r for r in report["cases"]}
    assert {r["case"] for r in report["cases"]} == {"case01"}
    assert rows["spleen"]["dice"] == 1.0 and rows["aorta"]["hd95_mm"] == 0.0
    assert 0.5 < rows["liver"]["dice"] < 1.0
    spacing = spacing_of(ts)
    check_rows_against_direct(report["cases"], pred, lut[ts_data], spacing)
    reasons = {(k["case"], k["skipped"]): k["reason"] for k in report["skipped"]}
    assert "no truth" in reasons[("lonely", "case")]
    assert "no prediction" in reasons[("nopred", "case")]
    assert "different grids" in reasons[("cropped", "case")] and "resample" in reasons[("cropped", "case")]
    assert "77" in reasons[("case01", "truth label 77")] and "unknown" in reasons[("case01", "truth label 77")]
    assert "vertebrae" in reasons[("case01", "truth label 19")]
    assert "skipped cropped: prediction and truth are on different grids" in captured.err
    assert "in the truth is unknown" in captured.err and "(1 case: case01; 3 voxels)" in captured.err
    md = (out / "table1.md").read_text()
    assert "## Skipped" in md and "lonely" in md and "| Liver | 1 |" in md
    # the CSV holds the same table the Python API returns
    with open(out / "regions.csv") as f:
        csv_regions = list(csv.DictReader(f))
    api = evaluate(pred_dir, truth_dir, truth_labels="total_mr", set_name="real MR")
    assert isinstance(api, Evaluation)
    assert [r["region"] for r in csv_regions] == [r["region"] for r in api.regions]
    assert [float(r["dice_mean"]) for r in csv_regions] == pytest.approx([r["dice_mean"] for r in api.regions])


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_give_clear_messages(tmp_path, abdomen, capsys):
    with pytest.raises(InputError, match="prediction folder not found"):
        evaluate(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label maps"):
        evaluate(tmp_path / "empty", tmp_path / "empty")
    bad_map = tmp_path / "map.csv"
    bad_map.write_text("value,structure\n1,spleen\n2,kidneyy\n")
    with pytest.raises(InputError, match="'kidneyy' is not a structure"):
        load_label_map(bad_map)
    (tmp_path / "nohead.csv").write_text("1,spleen\n")
    with pytest.raises(InputError, match="header"):
        load_label_map(tmp_path / "nohead.csv")
    with pytest.raises(InputError, match="label map not found"):
        load_label_map(tmp_path / "missing.json")
    soft = nib.Nifti1Image(np.asarray(abdomen.labels.dataobj).astype(np.float32) * 0.5, abdomen.labels.affine)
    with pytest.raises(InputError, match="non-integer"):
        evaluate_case(soft, abdomen.labels)
    other = make_phantom("abdomen", seed=20001, orientation="oblique")  # same voxels, tilted in space
    with pytest.raises(InputError, match="different grids"):
        evaluate_case(other.labels, abdomen.labels)
    # every case skipped: nothing to evaluate, exit code 2 with the reasons
    pred_dir, truth_dir = tmp_path / "p", tmp_path / "t"
    pred_dir.mkdir(), truth_dir.mkdir()
    nib.save(abdomen.labels, pred_dir / "a.nii.gz")
    nib.save(abdomen.labels, truth_dir / "b.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to evaluate" in err and "no prediction for the truth b.nii.gz" in err


def test_label_map_formats(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"1": "liver", "2": 24, "3": None}))
    m = load_label_map(tmp_path / "m.json")
    assert m.ids == {1: ID["liver"], 2: ID["prostate"]} and 3 in m.ignored
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Vertebrae L1": 1, "lung": 2}}))
    m = load_label_map(tmp_path / "dataset.json")
    assert m.ids == {1: ID["vertebrae_L1"]} and m.ignored == {2: "lung"}
    (tmp_path / "names.json").write_text(json.dumps({"leber": 3, "liver": 2}))
    m = load_label_map(tmp_path / "names.json")
    assert m.ids == {2: ID["liver"]} and m.ignored == {3: "leber"}
    (tmp_path / "m.csv").write_text("value,structure,note\n5,kidney_left,x\n6,,not ours\n")
    m = load_label_map(tmp_path / "m.csv")
    assert m.ids == {5: ID["kidney_left"]} and 6 in m.ignored
