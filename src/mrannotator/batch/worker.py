"""The batch worker: a long-lived Ray actor holding one loaded :class:`~mrannotator.Segmenter`.

Models load once per worker, in the constructor. A GPU worker runs two calls at a time (``max_concurrency=2``,
the driver keeps two cases in flight per worker) and only the network pass holds the lock, so one case is
read (and checksummed) or written while the other is in inference; a CPU worker takes one case at a time
(``cluster.cases_in_flight``).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import InputError
from .inputs import Case
from .ledger import FINAL_FAILURE, Ledger, fingerprint, input_checksum


def read_case(case: Case):
    """The case's volume, through the project's readers only (NIfTI: imageio; DICOM: mrannotator.dicom)."""
    from ..imageio import load_image

    if case.kind == "dicom":
        from ..dicom import find_series, load_series

        series = find_series(case.path, stack=case.stack or None).choose(case.series_uid)  # the planned stack
        if [str(f) for f in series.files] != list(case.files):
            raise InputError(f"DICOM series {case.series_uid} in {case.path} changed since the batch was planned")
        return load_image(load_series(series))  # load_image: the same 3D / finite / affine checks
    return load_image(case.path)


def structure_rows(result, image) -> list[dict]:
    """The JSON report's structures (name, id, voxels, ml) plus the mean image intensity inside each."""
    labels = np.asanyarray(result.labels.dataobj).ravel()
    data = np.asanyarray(image.dataobj).ravel().astype(np.float64)
    sums = np.bincount(labels, weights=data, minlength=256)
    rows = []
    for s in result.summary()["structures"]:
        n = s["voxels"]
        rows.append({"structure": s["name"], "id": s["id"], "voxels": n, "volume_ml": s["volume_ml"],
                     "mean_intensity": round(float(sums[s["id"]] / n), 4) if n else None})
    return rows


class SegmentWorker:
    """One worker process: models loaded once; ``process`` segments one case and records it in the ledger."""

    def __init__(self, out_dir: str, run: dict, weights: str | None, device: str, threads: int, mode: str,
                 regions: list[str] | None, preview: bool):
        from ..engine import Segmenter

        self.out_dir = Path(out_dir)
        self.run = run  # run id and the key every record carries (weights version, mode)
        self.preview = preview
        self.ledger = Ledger(self.out_dir)
        self.segmenter = Segmenter(weights=weights, device=device, threads=threads, mode=mode, regions=regions)
        self._network = threading.Lock()

    def ready(self, paths: list[str] = ()) -> dict:
        """Who this worker is, and which of ``paths`` (INPUT, OUT) it cannot see (not mounted on its node)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "host": os.uname().nodename, "models": [m.dataset for m in self.segmenter.models],
                "missing": [p for p in paths if not os.path.exists(p)]}

    def process(self, case: Case, attempt: int) -> dict:
        """Segment ``case``, write its outputs and its ledger record; the record is returned.

        A refused input (corrupt, not MR, no usable geometry) or any other error is a failed record: the
        batch goes on. Only the death of this process stops the call (the driver then retries the case).
        """
        import ray

        t0 = time.perf_counter()
        waited = 0.0
        record = {"case": case.name, "path": case.path, "kind": case.kind, "regions": case.route.label,
                  "routed_by": case.route.reason, **self.run, "attempt": attempt,
                  "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "header": case.header,
                  "private": case.private, "series_number": case.series_number}
        try:
            record["checksum"] = input_checksum(case.files)
            image = read_case(case)
            t_wait = time.perf_counter()
            with self._network:
                waited = time.perf_counter() - t_wait  # the other case's network pass: not this case's cost
                result = self.segmenter.segment(image, regions=case.route.regions)
            record.update(self._write(case, result, image))
            record["status"] = "done"
        except InputError as e:
            record.update(status="failed", failure=FINAL_FAILURE, error=str(e))
        except Exception as e:  # one bad case must not stop the batch: recorded, tried again by the next run
            record.update(status="failed", failure="error", error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=8))
        record["seconds"] = round(time.perf_counter() - t0 - waited, 3)
        record["finished"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.ledger.write(record)
        return record

    def _write(self, case: Case, result, image) -> dict:
        from ..outputs import write_outputs

        # a private case's report names the case, not its folder
        seg_path, json_path = write_outputs(result, self.out_dir, case.name, case.name if case.private else case.path)
        outputs = {"labels": seg_path.name, "report": json_path.name}
        if self.preview:
            from ..preview import write_preview

            outputs["preview"] = write_preview(image, result.labels, self.out_dir / f"{case.name}_preview.png",
                                               result.structures, title=case.name).name
        return {"outputs": outputs, "output_files": {n: fingerprint(self.out_dir / n) for n in outputs.values()},
                "rows": structure_rows(result, image), "models_run": result.models_run,
                "segment_seconds": round(result.seconds, 3)}
