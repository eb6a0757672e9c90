"""Bounded memory: one class channel at a time, bit-identical to nnU-Net's whole-volume route; the budget check."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from mrannotator import lowmem_export, memory, nnunet_adapter
from mrannotator.orientation import reorient_to
from mrannotator.phantoms import make_phantom

pytestmark = pytest.mark.unit


def _upsampled_real_mr(real_mr, shape=(160, 128, 40)) -> nib.Nifti1Image:
    """The real MR on a finer grid (linear), so that every model resamples its logits up."""
    from scipy import ndimage

    src = nib.load(real_mr)
    data = np.asarray(src.dataobj)
    zoom = [t / s for t, s in zip(shape, data.shape, strict=True)]
    aff = src.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([1 / z for z in zoom])
    return nib.Nifti1Image(ndimage.zoom(data.astype(np.float32), zoom, order=1).astype(data.dtype), aff)


def _logits(segmenter, m, image):
    arr, aff, _ = reorient_to(np.asarray(image.dataobj), image.affine, tuple(m.folder.orientation))
    data, props = segmenter._preprocess(m, arr, aff)
    return segmenter._logits(m, torch.from_numpy(data)), props


@pytest.fixture(scope="module")
def upsampled(real_mr):
    return _upsampled_real_mr(real_mr)


def test_each_model_gives_stock_labels_and_own_class_probability_bit_for_bit(segmenter, upsampled):
    for m in segmenter.models:
        logits, props = _logits(segmenter, m, upsampled)
        stock_seg, stock_probs = nnunet_adapter.logits_to_labels(m.predictor, logits, props, with_probs=True)
        stock_conf = np.take_along_axis(stock_probs, stock_seg[None].astype(np.intp), 0)[0]
        seg, conf, probs = lowmem_export.convert(m.predictor, logits, props, "confidence")
        assert probs is None and conf.dtype == np.float32
        assert np.array_equal(seg, stock_seg), m.dataset
        fg = stock_seg > 0
        assert np.array_equal(conf[fg], stock_conf[fg]), m.dataset
        labels_only = lowmem_export.convert(m.predictor, logits, props, "labels")
        assert labels_only[1] is None and np.array_equal(labels_only[0], stock_seg)
    assert fg.sum() > 100  # the last model (spine) labels something here: the check is not between empty maps


def test_foreground_outside_the_candidates_gets_a_second_pass_with_the_same_result(segmenter, upsampled,
                                                                                    monkeypatch):
    m = next(m for m in segmenter.models if m.dataset == "Dataset004_Spine")
    logits, props = _logits(segmenter, m, upsampled)
    seg, conf, _ = lowmem_export.convert(m.predictor, logits, props, "confidence")
    monkeypatch.setattr(lowmem_export, "MARGIN", -np.inf)  # no candidate at all: every foreground voxel missing
    seg2, conf2, _ = lowmem_export.convert(m.predictor, logits, props, "confidence")
    assert (seg > 0).sum() > 100
    assert np.array_equal(seg, seg2) and np.array_equal(conf, conf2)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_softmax_at_voxels_equals_torch_on_the_whole_volume(threads):
    assert lowmem_export.softmax_emulation_holds()
    rng = np.random.default_rng(threads)
    for classes, n in ((5, 50_021), (23, 9_999)):
        x = rng.normal(0, 8, (classes, n)).astype(np.float32)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            full = torch.softmax(torch.from_numpy(x), 0).numpy()
        finally:
            torch.set_num_threads(old)
        idx = np.unique(np.concatenate([rng.choice(n, n // 7, replace=False), np.arange(n - 40, n)]))
        assert np.array_equal(lowmem_export.softmax_at(x[:, idx], idx, n, threads), full[:, idx])


def test_merged_labels_equal_the_whole_probability_route(segmenter, upsampled):
    low = segmenter.segment(upsampled)
    full = segmenter.segment(upsampled, probabilities=True)
    assert np.array_equal(np.asarray(low.labels.dataobj), np.asarray(full.labels.dataobj))
    assert low.overlaps == full.overlaps and low.overlaps > 0  # the merge rule was exercised


def test_estimate_follows_voxels_not_the_number_of_models(segmenter):
    profiles = [memory.profile(m.dataset, m.predictor) for m in segmenter.models]
    one = memory.estimate((512, 512, 200), (0.7, 0.7, 1.0), profiles[:1])
    four = memory.estimate((512, 512, 200), (0.7, 0.7, 1.0), profiles)
    double = memory.estimate((512, 512, 400), (0.7, 0.7, 1.0), profiles)
    assert four.total < 1.2 * one.total  # models run one after another
    assert 1.8 * four.total < double.total < 2.2 * four.total
    assert memory.estimate((512, 512, 200), (0.7, 0.7, 1.0), profiles, probabilities=True).total > 4 * four.total
    with pytest.raises(memory.MemoryBudgetError, match=r"needs an estimated [\d.]+ GB \(input grid .*budget is 1 GB"):
        memory.check((512, 512, 200), (0.7, 0.7, 1.0), profiles, budget=10**9)


def test_budget_setting(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "2.5")
    assert memory.budget_bytes() == 2.5e9
    for bad in ("abc", "-1", "0", "inf"):
        monkeypatch.setenv(memory.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=memory.BUDGET_ENV):
            memory.budget_bytes()
    monkeypatch.delenv(memory.BUDGET_ENV)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory.budget_bytes() <= machine // 2


def test_cli_over_the_budget_exits_2_before_inference(tmp_path, demo_weights):
    ph = make_phantom("knee", seed=5)
    src = tmp_path / "knee.nii.gz"
    nib.save(ph.image, src)
    env = {**os.environ, memory.BUDGET_ENV: "0.001"}
    r = subprocess.run([sys.executable, "-m", "mrannotator.cli", "segment", "-i", str(src), "-o",
                        str(tmp_path / "out"), "--weights", str(demo_weights), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "needs an estimated" in r.stderr and "memory budget is 0.001 GB" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "predicting" not in r.stderr
    assert not (tmp_path / "out").exists()
