"""Shared fixtures: real data, real demo weights, one engine per test session."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def realm():
    """A Keycloak-like realm on 127.0.0.1 (mrannotator.testing.realm_support.Realm), one per test module."""
    from mrannotator.testing.realm_support import Realm

    r = Realm()
    yield r
    r.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: engine and library tests, no server")
    config.addinivalue_line("markers", "server: starts a real MONAI Label server on 127.0.0.1")
    config.addinivalue_line("markers", "pacs: starts a real Orthanc on 127.0.0.1")
    config.addinivalue_line("markers", "browser: drives Debian's chromium through Playwright")
    config.addinivalue_line("markers", "cluster: starts Ray (local or `ray start` nodes)")
    config.addinivalue_line("markers", "study: an annotation study or benchmark-sized run")
    config.addinivalue_line("markers", "exclusive: runs with nothing else (scripts/test.sh's second phase): "
                            "Ray on the whole machine, or an answer-time bound")


def ci_forbids_skips() -> bool:
    """In CI (``CI`` set, as CI runs ``.ci/run``) a skipped test is a missing component, which is an
    install bug: it fails the run instead of hiding a whole feature."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_forbids_skips() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI is set, so a skip is an install bug): {reason}"


# Lanes of the modules that do not name their own (``pytestmark``): ``pytest -m server`` runs one lane; the
# README's test command runs all of them. A module in no lane fails collection, so a new one gets a lane.
LANES = {
    "test_annotation_loop": "study", "test_bad_input": "server", "test_batch": "cluster", "test_catalogue": "unit",
    "test_cli": "unit", "test_dicom_ingest": "unit", "test_engine": "unit", "test_evaluation": "unit",
    "test_install": "unit", "test_map": "unit", "test_monailabel_app": "server", "test_nnunet_adapter": "unit",
    "test_ohif_browser": "browser", "test_pacs": "pacs", "test_performance": "unit", "test_phantoms": "unit",
    "test_server_auth": "server", "test_server_load": "server", "test_training_publish": "server",
    "test_weights": "unit",
}
LANE_NAMES = ("unit", "server", "pacs", "browser", "cluster", "study")
# scripts/test.sh runs the suite in two phases: every module not marked ``exclusive`` on two pytest-xdist
# workers (a module stays on one worker), then the exclusive ones alone. Exclusive: the cluster lane (Ray
# sessions and `ray start` nodes of the whole machine, and checks that no other Ray is there; the quirks
# module's one local Ray runs in phase 1, where no other Ray runs) and the modules that bound an answer time
# (a second worker's load must not decide them). The browser modules share the machine: they were written
# and passed at load averages of 5-7.
EXCLUSIVE_LANES = ("cluster",)
EXCLUSIVE_MODULES = {"test_ohif_pacs_outage_browser", "test_pacs_outage", "test_proxy_and_origin",
                     "test_server_load", "test_server_realm_http", "test_web_rules"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    unlaned = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if not any(item.get_closest_marker(lane) for lane in LANE_NAMES):
            if module in LANES:
                item.add_marker(getattr(pytest.mark, LANES[module]))
            else:
                unlaned.add(module)
        if module in EXCLUSIVE_MODULES or any(item.get_closest_marker(lane) for lane in EXCLUSIVE_LANES):
            item.add_marker(pytest.mark.exclusive)
    if unlaned:
        raise pytest.UsageError(f"test modules in no lane (add pytestmark or a LANES entry): {sorted(unlaned)}")
