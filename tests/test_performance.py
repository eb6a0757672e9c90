"""Speed options keep their promises: exact mode is the default, fast mode stays close, skipping loses nothing.

(Timings are measured in bench/, not here.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mrannotator.performance import count_network_calls, cpu_supports_bf16, tune_allocator
from mrannotator.phantoms import in_larger_field_of_view, make_phantom

HELD_OUT = 20_500  # seeds never used in training (< 1000) nor in the weights' own held-out set (10000+)
REGIONS = ["abdomen", "pelvis", "prostate", "shoulder", "knee", "spine"]


@pytest.fixture(scope="module")
def fast_segmenter(demo_weights):
    from mrannotator import Segmenter

    return Segmenter(weights=demo_weights, device="cpu", mode="fast")


@pytest.fixture(scope="module")
def skipping_segmenter(demo_weights):
    from mrannotator import Segmenter

    return Segmenter(weights=demo_weights, device="cpu", skip_absent_regions=True)


def test_allocator_is_tuned_on_load(segmenter):
    assert tune_allocator() is True  # glibc here: mallopt accepted both settings


def test_exact_mode_is_the_default_and_every_output_says_its_mode(segmenter, fast_segmenter, real_mr):
    assert segmenter.segment(real_mr, regions=["abdomen"]).summary()["mode"] == "exact"
    mode = fast_segmenter.segment(real_mr, regions=["abdomen"]).summary()["mode"]
    assert mode == ("fast (bf16)" if cpu_supports_bf16() else "fast (fp32: no native bf16 on this CPU)")


def _dice_per_class(a, b):
    out = {}
    for k in set(np.unique(a)) | set(np.unique(b)):
        if k:
            out[int(k)] = 2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
    return out


@pytest.mark.parametrize("region", REGIONS + ["real_mr"])
def test_fast_mode_matches_exact_mode(region, segmenter, fast_segmenter, real_mr):
    if region == "real_mr":
        image, judged = real_mr, None
    else:
        phantom = make_phantom(region, seed=HELD_OUT)
        image, judged = phantom.image, set(phantom.structures)  # the structures the phantom holds
    exact = np.asarray(segmenter.segment(image).labels.dataobj)
    fast = np.asarray(fast_segmenter.segment(image).labels.dataobj)
    assert (exact > 0).sum() > 0
    # classes with at least 20 voxels: a Dice on a handful of voxels is noise, not a precision effect
    dice = {k: d for k, d in _dice_per_class(exact, fast).items()
            if (exact == k).sum() >= 20 and (judged is None or k in judged)}
    assert dice
    # Measured (bench/README.md): >= 0.99 on every phantom structure; on the real MR sample, where the
    # phantom-trained demo models are far outside what they learnt and near-ties abound, 0.976
    assert min(dice.values()) >= (0.97 if region == "real_mr" else 0.99), dice
    assert (exact != fast).mean() < 0.01


@pytest.mark.parametrize("region", ["abdomen", "prostate", "knee", "spine"])
def test_region_skipping_skips_only_silent_models_and_changes_no_label(region, segmenter, skipping_segmenter):
    image = make_phantom(region, seed=HELD_OUT + 1).image
    full = segmenter.segment(image)
    skipped = skipping_segmenter.segment(image)
    assert np.array_equal(np.asarray(full.labels.dataobj), np.asarray(skipped.labels.dataobj))
    # each model alone: a skipped model is one whose own pass labels nothing (the coarse pass may still see
    # a few voxels where its tiling differs from the real one: then the model runs, which is the safe side)
    silent = {m.dataset for m in segmenter.models
              if not np.asarray(segmenter.segment(image, regions=m.folder.regions()).labels.dataobj).any()}
    assert set(skipped.extra["skipped_absent"]) <= silent
    assert set(skipped.models_run) == {m.dataset for m in segmenter.models} - set(skipped.extra["skipped_absent"])
    assert skipped.summary()["skipped_absent"] == skipped.extra["skipped_absent"]
    if region == "prostate":  # measured: the abdomen model paints nothing there, within one of its patches
        assert "Dataset001_Abdomen" in skipped.extra["skipped_absent"]


def _knee_in_a_large_field_of_view():
    # a knee phantom inside a field of view six times its size: several patches of every model
    return in_larger_field_of_view(make_phantom("knee", seed=HELD_OUT + 2).image)


def test_region_skipping_on_an_image_of_several_patches(segmenter, skipping_segmenter):
    # the coarse pass covers the image with a subset of the real tiles; models that find something then run
    # the real pass, which must give the same labels as without the check
    image = _knee_in_a_large_field_of_view()
    full = segmenter.segment(image)
    skipped = skipping_segmenter.segment(image)
    assert np.array_equal(np.asarray(full.labels.dataobj), np.asarray(skipped.labels.dataobj))
    assert "Dataset002_ShoulderKnee" in skipped.models_run


def _network_calls(seg, image):
    """(network calls per model, result) of one segment call."""
    with count_network_calls(seg) as calls:
        return calls, seg.segment(image)


def test_region_skipping_adds_no_network_work_to_the_models_it_runs(segmenter, skipping_segmenter):
    # the coarse pass's tiles are tiles of the real pass and their outputs are reused: a model that is run
    # calls its network exactly as often as without skipping; a skipped one at most as often
    image = _knee_in_a_large_field_of_view()
    plain_calls, _ = _network_calls(segmenter, image)
    skip_calls, skipped = _network_calls(skipping_segmenter, image)
    assert any(plain_calls[d] > 1 for d in skipped.models_run)  # several tiles, so a cover could be smaller
    for d in skipped.models_run:
        assert skip_calls[d] == plain_calls[d], (d, skip_calls, plain_calls)
    for d in skipped.extra["skipped_absent"]:
        assert 0 < skip_calls[d] <= plain_calls[d], (d, skip_calls, plain_calls)
