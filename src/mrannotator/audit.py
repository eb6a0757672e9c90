"""One JSON audit record per run: what ran on which study, what came out, where it went, how long it took.

    audit = RunAudit(tool="map")
    audit.source(first_dataset); audit.model(...); audit.timed("segment", seconds); audit.outputs(files)
    audit.finish(exit_code, error); audit.write(out_dir)

The record names studies and series by UID only: no patient name, ID, birth date or any other patient
attribute is copied into it (the source dataset is read for four UIDs/numbers, nothing else). It is
written crash-safely (temp file, fsync, rename) as OUT/mrannotator_audit.json, and, when
MRANNOTATOR_AUDIT_DIR is set, also as AUDIT_DIR/<started>_<run id>.json (an append-only audit folder,
which also receives the records of runs that were refused and wrote no output).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import time
import uuid
from pathlib import Path

AUDIT_FILE = "mrannotator_audit.json"
AUDIT_DIR_ENV = "MRANNOTATOR_AUDIT_DIR"
SCHEMA = "mrannotator-audit/1"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _write(path: Path, record: dict) -> Path:
    from .imageio import write_atomic

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


class RunAudit:
    """Collects a run's audit record; :meth:`write` saves it."""

    def __init__(self, tool: str):
        self._t0 = time.perf_counter()
        self.record: dict = {
            "schema": SCHEMA, "run_id": str(uuid.uuid4()), "tool": tool, "started": _now(), "finished": None,
            "status": "running", "exit_code": None, "error": None,
            "host": socket.gethostname(), "platform": platform.platform(),
            "input": {}, "model": {}, "outputs": [], "destination": None, "delivery": None, "timings_s": {},
        }

    def source(self, ds, input_path: str | None = None) -> None:
        """UIDs of the study and series segmented (nothing else of the dataset is kept)."""
        self.record["input"] = {
            "path": input_path,
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "series_number": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
            "modality": str(ds.get("Modality", "")),
        }

    def model(self, *, name: str, version: str, device_uid: str | None, weights: dict) -> None:
        kept = ("source", "version", "models", "sha256", "root")
        self.record["model"] = {"name": name, "version": version, "device_uid": device_uid,
                                "weights": {k: weights.get(k) for k in kept}}

    def timed(self, stage: str, seconds: float) -> None:
        self.record["timings_s"][stage] = round(self.record["timings_s"].get(stage, 0.0) + seconds, 3)

    def outputs(self, items: list[dict]) -> None:
        self.record["outputs"].extend(items)

    def delivery(self, destination: dict | None, outcome: dict | None) -> None:
        self.record["destination"], self.record["delivery"] = destination, outcome

    @property
    def delivered(self) -> bool | None:
        d = self.record["delivery"]
        return None if d is None else d.get("status") == "delivered"

    def finish(self, exit_code: int, error: str | None = None) -> dict:
        r = self.record
        r["exit_code"], r["error"], r["finished"] = int(exit_code), error, _now()
        if exit_code == 0:
            r["status"] = "succeeded"
        elif r["delivery"] is not None and r["delivery"].get("status") != "delivered":
            r["status"] = "delivery_failed"
        else:
            r["status"] = "failed"
        r["timings_s"]["total"] = round(time.perf_counter() - self._t0, 3)
        return r

    def write(self, out_dir: str | Path | None, name: str = AUDIT_FILE) -> list[Path]:
        """Save the record as ``out_dir/name`` (when given) and in $MRANNOTATOR_AUDIT_DIR (when set)."""
        written = []
        if out_dir is not None:
            written.append(_write(Path(out_dir) / name, self.record))
        audit_dir = os.environ.get(AUDIT_DIR_ENV)
        if audit_dir:
            stamp = self.record["started"].replace(":", "").replace("-", "")[:15]
            written.append(_write(Path(audit_dir) / f"{stamp}_{self.record['run_id']}.json", self.record))
        return written
