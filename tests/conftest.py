"""Shared fixtures: real data, real demo weights, one engine per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_MR_DIR = ROOT.parent / "shared" / "data" / "real_mr"
DEMO_WEIGHTS = ROOT / "models" / "demo"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def real_mr() -> Path:
    """The real abdominal MR sample (LPS, int16, 3 mm), read from ../shared, never copied."""
    p = REAL_MR_DIR / "example_mr_sm.nii.gz"
    assert p.is_file(), f"real MR sample missing: {p}"
    return p


@pytest.fixture(scope="session")
def demo_weights() -> Path:
    assert (DEMO_WEIGHTS / "Dataset001_Abdomen").is_dir(), f"demo weights missing in {DEMO_WEIGHTS}"
    return DEMO_WEIGHTS


@pytest.fixture(scope="session")
def segmenter(demo_weights):
    """All four demo region models, loaded once for the whole session (CPU)."""
    from mrannotator import Segmenter

    return Segmenter(weights=demo_weights, device="cpu")
