"""The server refuses an infer whose estimated memory is over the budget: 413 with the estimate, before any work."""

from __future__ import annotations

import nibabel as nib
import pytest
import requests

from mrannotator.memory import BUDGET_ENV
from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def small_budget_server(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("memory_budget")
    studies = root / "studies"
    studies.mkdir()
    nib.save(make_phantom("knee", seed=21).image, studies / "knee.nii.gz")
    srv = start_server(root, studies, demo_weights, env={BUDGET_ENV: "0.001"})
    yield srv
    stop_server(srv)


@pytest.mark.parametrize("task", ["mrannotator", "mrannotator_shoulderknee"])
def test_infer_over_the_budget_gets_413_with_the_estimate(small_budget_server, task):
    r = requests.post(f"{small_budget_server.url}/infer/{task}", params={"image": "knee", "output": "json"},
                      timeout=300)
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "needs an estimated" in detail and "input grid" in detail and "budget is 0.001 GB" in detail, detail
    assert BUDGET_ENV in detail
