"""The MONAI Label server under load: concurrent infers and label saves while /info is polled.

    .venv/bin/python bench/server_load.py [--infers 12] [--labels 12] [--infer-queue 16] [--task mrannotator]
                                          [--train] [--weights DIR] [--device cpu]

Starts `monailabel start_server --app apps/mrannotator` on 127.0.0.1 with a temp studies folder of
knee and abdomen phantoms, then at once: ``--infers`` infer requests (50 ms apart, so their arrival
order is known), ``--labels`` label saves (each a different phantom's labels on an image's grid, tags
``final`` and ``load1``, ``load2``...) and GET /info every second. It reports every status, whether the
accepted infers finished in arrival order, whether each label reads back (GET /datastore/label) byte
for byte as uploaded, and the /info and label-save latencies (median, p95, max). ``--train`` then
starts a fine-tuning run and repeats the /info polling and a round of label saves while it runs.

:func:`mrannotator.testing.server_load.run_load` is the driver; ``tests/test_server_load.py`` runs a smaller
round of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

from mrannotator.testing.server_load import label_jobs, phantom_studies, run_load

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from mrannotator.testing.server_support import start_server, stop_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--infers", type=int, default=12)
    ap.add_argument("--labels", type=int, default=12)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--infer-queue", type=int, default=16)
    ap.add_argument("--task", default="mrannotator", help="infer task (mrannotator = all region models)")
    ap.add_argument("--region", default="knee", help="phantom region of the studies")
    ap.add_argument("--train", action="store_true", help="then poll /info and save labels during a training run")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mra-load-") as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        images = phantom_studies(studies, args.images, args.region)
        jobs = label_jobs(images, args.labels, args.region)
        server = start_server(root, studies, args.weights,
                              conf={"device": args.device, "infer_queue": str(args.infer_queue)})
        try:
            report = run_load(server.url, [images[i % len(images)] for i in range(args.infers)], jobs, args.task)
            out = {"load": report.summary()}
            if args.train:
                r = requests.post(f"{server.url}/train/mrannotator",
                                  json={"max_epochs": 2, "iterations": 10, "val_iterations": 1})
                assert r.status_code == 200, r.text
                deadline = time.time() + 600
                while requests.get(f"{server.url}/info/").json()["train_stats"]["mrannotator"].get("status") \
                        != "RUNNING":
                    assert time.time() < deadline
                    time.sleep(0.5)
                during = run_load(server.url, [images[0], images[1]], label_jobs(images, args.labels, args.region),
                                  args.task)
                out["during_training"] = during.summary()
                out["training_status_after"] = requests.get(f"{server.url}/train/").json().get("status")
        finally:
            stop_server(server)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
