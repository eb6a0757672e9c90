"""The server stays responsive under load: infers queue in a bounded FIFO, /info and label saves answer.

A real server (demo weights, CPU, ``--conf infer_queue 3``) gets 8 concurrent infers, 8 label saves
and /info every 0.25 s (the driver is bench/server_load.py, which runs the full 12 + 12 and records
figures in bench/README.md). Every infer is answered 200, or 503 with Retry-After once the queue is
full; accepted infers finish in arrival order; every label reads back byte for byte; /info p95 < 1 s.
"""

from __future__ import annotations

import pytest
import requests

from mrannotator.testing.server_load import label_jobs, phantom_studies, run_load
from mrannotator.testing.server_support import start_server, stop_server

pytestmark = pytest.mark.timeout(600)

INFER_QUEUE = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("load")
    studies = root / "studies"
    studies.mkdir()
    images = phantom_studies(studies, 4)
    # one torch thread: on a 2-core CI machine the other core stays for the event loop and the datastore
    srv = start_server(root, studies, demo_weights, conf={"infer_queue": str(INFER_QUEUE), "threads": "1"})
    srv.images = images
    yield srv
    stop_server(srv)


def test_infers_queue_and_info_and_label_saves_stay_responsive(server):
    images = server.images
    report = run_load(server.url, [images[i % len(images)] for i in range(8)], label_jobs(images, 8),
                      "mrannotator_shoulderknee", info_period=0.25)
    summary = report.summary()
    print(summary)
    assert len(report.infers) == 8 and len(report.labels) == 8  # every request answered
    assert {r["status"] for r in report.infers} <= {200, 503}, report.infers
    assert summary["infer_statuses"].get("200", 0) >= INFER_QUEUE + 1  # the running one and a full queue
    assert summary["infer_statuses"].get("503", 0) >= 1  # 8 arrive within 0.35 s; one infer takes longer
    assert summary["infer_503_with_retry_after"]
    assert all(int(r["retry_after"]) >= 1 for r in report.infers if r["status"] == 503)
    assert summary["infers_in_arrival_order"], report.infers
    assert {r["status"] for r in report.labels} == {200}, report.labels
    assert summary["labels_identical"] == 8
    assert not summary["info_errors"]
    assert summary["info_s"]["p95"] < 1.0, summary
    assert summary["label_save_s"]["max"] < 5.0, summary  # not stuck behind the infers


def test_routes_run_in_worker_threads_and_keep_their_parameters(server):
    """A 503 must come before anything is read; parameter validation and 404s still work."""
    r = requests.post(f"{server.url}/infer/mrannotator", params={"output": "nonsense", "image": server.images[0]})
    assert r.status_code == 422  # FastAPI's own parameter check still runs on the offloaded route
    r = requests.get(f"{server.url}/datastore/image/info", params={"image": server.images[0]})
    assert r.status_code == 200
    openapi = requests.get(f"{server.url}/openapi.json").json()
    assert "/infer/{model}" in openapi["paths"] and "/datastore/label" in openapi["paths"]
