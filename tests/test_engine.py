"""The engine: real demo nnU-Net models, exact geometry, laterality, fidelity to stock nnU-Net."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrannotator.catalogue import load_catalogue
from mrannotator.orientation import reorient_to
from mrannotator.phantoms import make_phantom

CAT = load_catalogue()
# a seed far from the training (<1000) and held-out (10000+) seeds
SEED = 31337
DATASET_OF = {"abdomen": "Dataset001_Abdomen", "shoulder": "Dataset002_ShoulderKnee",
              "pelvis": "Dataset003_PelvisProstate", "spine": "Dataset004_Spine"}
REGION_ARG = {"abdomen": ["abdomen"], "shoulder": ["shoulder", "knee"], "pelvis": ["pelvis", "prostate"],
              "spine": ["spine"]}


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def test_real_mr_gets_labels_on_the_exact_input_grid(segmenter, real_mr):
    src = nib.load(real_mr)
    result = segmenter.segment(real_mr)
    assert result.labels.shape == src.shape
    assert np.array_equal(result.labels.affine, src.affine)
    assert result.labels.get_data_dtype() == np.uint8
    assert result.weights["source"] == "demo"
    assert result.models_run == [m.dataset for m in segmenter.models]
    summary = result.summary()
    present = set(np.unique(np.asarray(result.labels.dataobj))) - {0}
    assert {r["id"] for r in summary["structures"]} == present
    for r in summary["structures"]:
        assert r["voxels"] > 0 and r["volume_ml"] == pytest.approx(r["voxels"] * 27 / 1000, rel=1e-3)


def _stock_predict(demo_weights: Path, dataset: str, image: nib.Nifti1Image, tmp: Path) -> np.ndarray:
    inp, out = tmp / "in", tmp / "out"
    inp.mkdir()
    nib.save(image, inp / "case_0000.nii.gz")
    env = {**os.environ, "nnUNet_results": str(demo_weights), "nnUNet_raw": str(tmp), "nnUNet_preprocessed": str(tmp)}
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inp), "-o", str(out),
           "-d", dataset[7:10], "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerNoMirroring",
           "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.asarray(nib.load(out / "case.nii.gz").dataobj)


@pytest.mark.parametrize("region", list(DATASET_OF))
def test_labels_equal_stock_nnunetv2_predict_voxel_for_voxel(region, segmenter, demo_weights, tmp_path):
    dataset = DATASET_OF[region]
    ph = make_phantom(region, seed=SEED, orientation="LAS")
    stock = _stock_predict(demo_weights, dataset, ph.image, tmp_path)
    # the very file stock nnU-Net read (its header stores the affine in float32)
    result = segmenter.segment(tmp_path / "in" / "case_0000.nii.gz", regions=REGION_ARG[region])
    ours = np.asarray(result.labels.dataobj)
    model = next(m for m in segmenter.models if m.dataset == dataset)
    assert np.array_equal(model.lut()[stock], ours)
    assert (ours > 0).sum() > 100  # the comparison is not between two empty maps


@pytest.mark.parametrize("orientation", ["LAS", "sagittal", "RAS"])
def test_preprocessed_input_is_bitwise_what_nnunet_reads_from_the_file(orientation, segmenter, tmp_path):
    # The engine's own reading + reorientation must give nnU-Net the very array its SimpleITK reader gives for
    # the same volume stored in the model's orientation: a different memory layout alone changed normalised
    # intensities by ~3e-6 and labels at near-ties (bench/README.md, full-size network).
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from mrannotator.imageio import load_image

    model = next(m for m in segmenter.models if m.dataset == "Dataset001_Abdomen")
    ph = make_phantom("abdomen", seed=SEED, orientation=orientation)
    path = tmp_path / "case_0000.nii.gz"
    nib.save(ph.image, path)
    img = load_image(path)
    arr, aff, _ = reorient_to(np.asanyarray(img.dataobj), img.affine, tuple(model.folder.orientation))
    ours, _ = segmenter._preprocess(model, arr, aff)

    las = tmp_path / "las_0000.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), las)
    x, props = SimpleITKIO().read_images([str(las)])
    pred = model.predictor
    pp = pred.configuration_manager.preprocessor_class(verbose=False)
    stock, _, _ = pp.run_case_npy(x, None, props, pred.plans_manager, pred.configuration_manager, pred.dataset_json)
    assert ours.shape == stock.shape and ours.dtype == stock.dtype
    assert np.array_equal(ours, stock)


def _physical_labels(result, ref_affine):
    """Labels brought onto the LAS reference grid (exact: axis permutations and flips only)."""
    arr, aff, _ = reorient_to(np.asarray(result.labels.dataobj), result.labels.affine, ("L", "A", "S"))
    assert np.allclose(aff, ref_affine)
    return arr


def _sides_ok(labels: np.ndarray, affine: np.ndarray) -> bool:
    """Right-sided structures lie at larger RAS x than their left twins (physical coordinates)."""
    ok = True
    for bone in ("humerus", "clavicle", "scapula"):
        xs = {}
        for side in ("right", "left"):
            idx = np.argwhere(labels == CAT.get(f"{bone}_{side}").id)
            if len(idx) == 0:
                return False
            xs[side] = (nib.affines.apply_affine(affine, idx))[:, 0].mean()
        ok &= xs["right"] > xs["left"]
    return bool(ok)


def test_every_storage_orientation_gives_the_same_physical_segmentation(segmenter):
    # the shoulder phantom is left/right symmetric apart from the labelled sides
    ref = make_phantom("shoulder", seed=SEED, orientation="LAS")
    ref_labels = np.asarray(segmenter.segment(ref.image, regions=["shoulder"]).labels.dataobj)
    assert _sides_ok(ref_labels, ref.image.affine)
    truth = np.asarray(ref.labels.dataobj)
    for sid in ref.structures:
        assert dice(ref_labels == sid, truth == sid) > 0.5, CAT.by_id(sid).name  # the model works at all
    for orientation in ("RAS", "LPS", "sagittal", "coronal", "axial_reversed"):
        ph = make_phantom("shoulder", seed=SEED, orientation=orientation)
        result = segmenter.segment(ph.image, regions=["shoulder"])
        assert np.array_equal(result.labels.affine, ph.image.affine)
        assert _sides_ok(np.asarray(result.labels.dataobj), ph.image.affine), orientation
        on_ref = _physical_labels(result, ref.image.affine)
        for sid in ref.structures:
            assert dice(on_ref == sid, ref_labels == sid) >= 0.99, (orientation, CAT.by_id(sid).name)


def test_oblique_input_keeps_its_affine_and_its_segmentation(segmenter):
    las = make_phantom("shoulder", seed=SEED, orientation="LAS")
    obl = make_phantom("shoulder", seed=SEED, orientation="oblique")
    a = np.asarray(segmenter.segment(las.image, regions=["shoulder"]).labels.dataobj)
    r = segmenter.segment(obl.image, regions=["shoulder"])
    assert np.array_equal(r.labels.affine, obl.image.affine)
    b = np.asarray(r.labels.dataobj)
    for sid in las.structures:
        assert dice(a == sid, b == sid) >= 0.99
    assert _sides_ok(b, obl.image.affine)


def test_a_pipeline_that_loses_laterality_fails_the_side_check(segmenter):
    # the bug of a pipeline that ignores orientation: a RAS-stored array handed over as if it were LAS
    ras = make_phantom("shoulder", seed=SEED, orientation="RAS")
    las = make_phantom("shoulder", seed=SEED, orientation="LAS")
    wrong = nib.Nifti1Image(np.asarray(ras.image.dataobj), las.image.affine)
    labels = np.asarray(segmenter.segment(wrong, regions=["shoulder"]).labels.dataobj)
    assert _sides_ok(labels, las.image.affine)  # the model itself still answers by array position ...
    assert not _sides_ok(labels, ras.image.affine)  # ... so in the true frame left and right are swapped


def test_intensities_are_never_narrowed_and_the_input_is_untouched(segmenter):
    ph = make_phantom("knee", seed=SEED, orientation="RAS")
    data = np.asarray(ph.image.dataobj)
    assert data.dtype == np.int16 and data.max() > 1000
    before = data.copy()
    a = np.asarray(segmenter.segment(ph.image, regions=["knee"]).labels.dataobj)
    assert np.array_equal(data, before)
    as_float = nib.Nifti1Image(data.astype(np.float64) + 0.25, ph.image.affine)
    b = np.asarray(segmenter.segment(as_float, regions=["knee"]).labels.dataobj)
    assert np.array_equal(np.asarray(as_float.dataobj), data.astype(np.float64) + 0.25)
    assert (a > 0).sum() > 100 and dice(a > 0, b > 0) > 0.99


def test_overlapping_region_models_follow_the_documented_rule(segmenter, real_mr):
    merged = segmenter.segment(real_mr, probabilities=True)
    labels = np.asarray(merged.labels.dataobj)
    # rebuild the merge from each model alone: the higher own-class probability wins overlaps
    best = np.zeros(labels.shape, np.float32)
    rebuilt = np.zeros(labels.shape, np.uint8)
    for m in segmenter.models:
        r = segmenter.segment(real_mr, regions=m.folder.regions(), probabilities=True)
        assert r.models_run == [m.dataset]
        own = np.asarray(r.labels.dataobj)
        conf = np.zeros(labels.shape, np.float32)
        for sid, p in r.probabilities.items():
            conf[own == sid] = p[own == sid]
        take = (own > 0) & ((rebuilt == 0) | (conf > best))
        rebuilt[take], best[take] = own[take], conf[take]
    assert np.array_equal(rebuilt, labels)
    assert merged.summary()["overlap_voxels"] == merged.overlaps


def test_structure_subset_and_probabilities(segmenter):
    ph = make_phantom("abdomen", seed=SEED, orientation="LPS")
    r = segmenter.segment(ph.image, structures=["liver", "kidney_left"], probabilities=True)
    assert r.models_run == ["Dataset001_Abdomen"]
    present = set(np.unique(np.asarray(r.labels.dataobj))) - {0}
    assert present == {CAT.get("liver").id, CAT.get("kidney_left").id}
    assert set(r.probabilities) == present
    for p in r.probabilities.values():
        assert p.shape == ph.image.shape and 0 <= p.min() and p.max() <= 1


def test_unknown_model_label_is_served_with_a_generic_code(demo_weights, tmp_path):
    import shutil

    from mrannotator import Segmenter

    src = next(demo_weights.glob("Dataset003_*"))
    dst = tmp_path / "w" / src.name
    shutil.copytree(src, dst)
    dj_path = next(dst.glob("*/dataset.json"))
    dj = json.loads(dj_path.read_text())
    dj["labels"] = {("adrenal_thing" if k == "sacrum" else k): v for k, v in dj["labels"].items()}
    dj_path.write_text(json.dumps(dj))
    with pytest.warns(UserWarning, match="adrenal_thing"):
        seg = Segmenter(weights=tmp_path / "w", device="cpu")
    extra = [s for s in seg.structures if not s.catalogued]
    assert len(extra) == 1 and extra[0].id >= 200 and extra[0].type.code == "91723000"
