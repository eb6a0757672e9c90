"""The load driver of ``bench/server_load.py`` and ``tests/test_server_load.py``: concurrent infers and label
saves against a running MONAI Label server while /info is polled (:func:`run_load`), and the phantom studies
and label uploads it sends (:func:`phantom_studies`, :func:`label_jobs`).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests


@dataclass
class LoadReport:
    infers: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    info_seconds: list[float] = field(default_factory=list)
    info_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @staticmethod
    def percentile(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]

    def accepted_in_arrival_order(self) -> bool:
        done = [r["finished"] for r in sorted(self.infers, key=lambda r: r["index"]) if r["status"] == 200]
        return done == sorted(done)

    def summary(self) -> dict:
        label_s = [r["seconds"] for r in self.labels]
        statuses: dict[str, int] = {}
        for r in self.infers:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        return {
            "seconds": round(self.seconds, 1),
            "infer_statuses": statuses,
            "infer_503_with_retry_after": all(r["retry_after"] for r in self.infers if r["status"] == 503),
            "infers_in_arrival_order": self.accepted_in_arrival_order(),
            "infer_seconds_max": round(max((r["seconds"] for r in self.infers), default=0), 2),
            "label_statuses": sorted({r["status"] for r in self.labels}),
            "labels_identical": sum(bool(r["identical"]) for r in self.labels),
            "labels": len(self.labels),
            "label_save_s": {"median": round(statistics.median(label_s), 3) if label_s else None,
                             "p95": round(self.percentile(label_s, 0.95), 3),
                             "max": round(max(label_s, default=0), 3)},
            "info_polls": len(self.info_seconds),
            "info_s": {"median": round(statistics.median(self.info_seconds), 3) if self.info_seconds else None,
                       "p95": round(self.percentile(self.info_seconds, 0.95), 3),
                       "max": round(max(self.info_seconds, default=0), 3)},
            "info_errors": self.info_errors,
        }


def run_load(url: str, infer_images: list[str], label_jobs: list[tuple[str, str, bytes]], task: str,
             info_period: float = 1.0, timeout: float = 600) -> LoadReport:
    """Infers on ``infer_images`` (50 ms apart) and label saves ``(image, tag, nifti bytes)`` at once, while
    /info is polled every ``info_period`` s; then each label is read back and compared byte for byte."""
    report = LoadReport()
    stop = threading.Event()
    t_start = time.perf_counter()

    def poll_info():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = requests.get(f"{url}/info/", timeout=timeout)
                if r.status_code != 200:
                    report.info_errors.append(f"HTTP {r.status_code}")
            except requests.RequestException as e:
                report.info_errors.append(str(e))
            report.info_seconds.append(time.perf_counter() - t0)
            stop.wait(info_period)

    def infer(index: int, image: str):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/infer/{task}", params={"image": image, "output": "json"}, timeout=timeout)
        t1 = time.perf_counter()
        report.infers.append({"index": index, "image": image, "status": r.status_code,
                              "retry_after": r.headers.get("Retry-After"), "seconds": t1 - t0, "finished": t1,
                              "model_version": r.json().get("model_version") if r.status_code == 200 else None,
                              "detail": None if r.status_code == 200 else r.text[:300]})

    def save_label(image: str, tag: str, data: bytes):
        t0 = time.perf_counter()
        r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag},
                         files={"label": (f"{image}.nii.gz", data)}, timeout=timeout)
        report.labels.append({"image": image, "tag": tag, "status": r.status_code,
                              "seconds": time.perf_counter() - t0, "identical": None,
                              "detail": None if r.status_code == 200 else r.text[:300]})

    poller = threading.Thread(target=poll_info, daemon=True)
    poller.start()
    workers = []
    for image, tag, data in label_jobs:
        workers.append(threading.Thread(target=save_label, args=(image, tag, data)))
    for i, image in enumerate(infer_images):
        workers.append(threading.Thread(target=infer, args=(i, image)))
    for w in workers[len(label_jobs):]:  # infers first, 50 ms apart: their arrival order is known
        w.start()
        time.sleep(0.05)
    for w in workers[:len(label_jobs)]:
        w.start()
    for w in workers:
        w.join(timeout)
    stop.set()
    poller.join()
    report.seconds = time.perf_counter() - t_start
    uploaded = {(image, tag): data for image, tag, data in label_jobs}
    for row in report.labels:
        r = requests.get(f"{url}/datastore/label", params={"label": row["image"], "tag": row["tag"]}, timeout=60)
        row["identical"] = r.status_code == 200 and r.content == uploaded[(row["image"], row["tag"])]
    return report


def phantom_studies(studies: Path, n_images: int, region: str = "knee") -> list[str]:
    import nibabel as nib

    from mrannotator.phantoms import make_phantom

    ids = []
    for i in range(n_images):
        ids.append(f"{region}{i}")
        nib.save(make_phantom(region, seed=300 + i).image, studies / f"{ids[-1]}.nii.gz")
    return ids


def label_jobs(images: list[str], n_labels: int, region: str = "knee") -> list[tuple[str, str, bytes]]:
    """``n_labels`` saves spread over the images and tags; each a different phantom's labels (same grid)."""
    import nibabel as nib

    from mrannotator.phantoms import make_phantom

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n_labels):
            image = images[k % len(images)]
            tag = "final" if k < len(images) else f"load{k // len(images)}"
            path = Path(tmp) / f"{k}.nii.gz"
            nib.save(make_phantom(region, seed=500 + k).labels, path)  # uint8, the image's grid
            jobs.append((image, tag, path.read_bytes()))
    return jobs
