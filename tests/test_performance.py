"""Speed options keep their promises: exact mode is the default, fast mode stays close, skipping loses nothing.

(Timings are measured in bench/, not here.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mrannotator.performance import cpu_supports_bf16, tune_allocator
from mrannotator.phantoms import make_phantom

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
    image = real_mr if region == "real_mr" else make_phantom(region, seed=HELD_OUT).image
    exact = np.asarray(segmenter.segment(image).labels.dataobj)
    fast = np.asarray(fast_segmenter.segment(image).labels.dataobj)
    assert (exact > 0).sum() > 0
    # classes with at least 20 voxels: a Dice on a handful of voxels is noise, not a precision effect.
    # Measured on the demo weights: 0.949-1.00 per class (issue #6 asks 0.99; not reached, see bench/README.md)
    big = {k: d for k, d in _dice_per_class(exact, fast).items() if (exact == k).sum() >= 20}
    assert big and min(big.values()) >= 0.93, big
    assert (exact != fast).mean() < 0.01


@pytest.mark.parametrize("region", ["abdomen", "knee", "spine"])
def test_region_skipping_changes_no_label(region, segmenter, skipping_segmenter):
    image = make_phantom(region, seed=HELD_OUT + 1).image
    full = segmenter.segment(image)
    skipped = skipping_segmenter.segment(image)
    assert np.array_equal(np.asarray(full.labels.dataobj), np.asarray(skipped.labels.dataobj))
    # (on the demo weights the half-resolution check still finds stray foreground in every model, so it
    # skips nothing yet: bench/region_skip.py measures that; here we hold the safety promise only)
    assert set(skipped.extra["skipped_absent"]) | set(skipped.models_run) == {m.dataset for m in segmenter.models}
