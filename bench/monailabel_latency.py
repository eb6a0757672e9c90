"""Warm infer latency: the MONAI Label server (MONAILabelClient round trip) against the engine alone.

    .venv/bin/python bench/monailabel_latency.py [--image PATH] [--weights DIR] [--runs 7] [--task mrannotator]

Starts `monailabel start_server --app apps/mrannotator` on 127.0.0.1 (a temp studies folder holding
a copy of the image), and in this process a ``Segmenter`` on the same weights and device. After one
warm-up call each, it alternates server and engine calls (so background load hits both alike) and
reports the medians and their ratio. The server figure is the full client round trip: request, image
read, prediction, result file written, multipart response, file saved by the client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared" / "data" / "real_mr" / "example_mr_sm.nii.gz")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--task", default="mrannotator", help="infer task (mrannotator = all region models)")
    args = ap.parse_args(argv)

    from monailabel.client import MONAILabelClient

    from mrannotator.engine import Segmenter

    work = Path(tempfile.mkdtemp(prefix="mra-bench-"))
    studies = work / "studies"
    studies.mkdir()
    shutil.copy(args.image, studies / "bench_image.nii.gz")
    port = free_port()
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(work / "sessions")}
    cmd = [str(venv_bin / "monailabel"), "start_server", "--app", str(ROOT / "apps" / "mrannotator"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "weights", str(args.weights), "--conf", "device", args.device,
           "--conf", "model_dir", str(work / "model")]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(work / "client"))
        (work / "client").mkdir()
        deadline = time.time() + 300
        while True:
            try:
                client.info()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not come up; see {work / 'server.log'}") from None
                time.sleep(1)

        seg = Segmenter(weights=args.weights, device=args.device)
        regions = None
        if args.task != "mrannotator":
            name = args.task.removeprefix("mrannotator_")
            model = next(m for m in seg.models if m.dataset.split("_", 1)[1].lower() == name)
            regions = model.folder.regions()

        def server_call() -> float:
            t = time.perf_counter()
            client.infer(args.task, "bench_image", {})
            return time.perf_counter() - t

        def engine_call() -> float:
            t = time.perf_counter()
            seg.segment(args.image, regions=regions)
            return time.perf_counter() - t

        server_call(), engine_call()  # warm-up: first-call allocations, caches
        server_times, engine_times = [], []
        for _ in range(args.runs):
            server_times.append(server_call())
            engine_times.append(engine_call())
        s, e = statistics.median(server_times), statistics.median(engine_times)
        report = {
            "image": str(args.image),
            "task": args.task,
            "models": [m.dataset for m in seg.models if regions is None or set(m.folder.regions()) & set(regions)],
            "device": args.device,
            "runs": args.runs,
            "server_median_s": round(s, 3),
            "engine_median_s": round(e, 3),
            "ratio": round(s / e, 3),
            "server_s": [round(x, 3) for x in server_times],
            "engine_s": [round(x, 3) for x in engine_times],
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
