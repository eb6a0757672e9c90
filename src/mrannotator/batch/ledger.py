"""The resume ledger: one record per finished case in ``OUT/ledger/CASE.json``.

A record is written atomically by the worker that made the case's outputs, right after them, so a case
whose outputs exist has its record too (unless the worker died between the two renames, in which case it
is simply done again, with identical outputs). A record holds the input's SHA-256 and the key of the run
that made it (weights version, mode, regions); a later run skips a case only when both still match, so a
changed input file or other weights re-process it. The cohort tables are built from the records alone,
which is why a resumed run ends with the same tables as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..imageio import save_json
from ..weights import Weights

LEDGER_DIR = "ledger"
# a failed case is tried again by the next run, unless its input itself was refused (corrupt, not MR, ...):
# that verdict holds for as long as the input and the weights are the same
FINAL_FAILURE = "input"


def input_checksum(files: Iterable[str | Path]) -> str:
    """SHA-256 over the contents of ``files`` in the order given (each file's length first)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            fh.seek(0, 2)
            h.update(fh.tell().to_bytes(8, "little"))
            fh.seek(0)
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(path: Path) -> dict:
    """Size, modification time and SHA-256 of an output file, as its ledger record keeps them."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": input_checksum([path])}


def outputs_intact(out_dir: Path, record: dict) -> bool:
    """Whether every output a record lists exists with the size and content it had when the record was written
    (the hash is computed again only when the modification time differs). A record of a refused input has
    none; a record from before outputs were fingerprinted is not trusted."""
    if record.get("status") != "done":
        return True
    files = record.get("output_files")
    if not files:
        return False
    for name, want in files.items():
        p = Path(out_dir) / name
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_size != want.get("size"):
            return False
        if st.st_mtime_ns != want.get("mtime_ns") and input_checksum([p]) != want.get("sha256"):
            return False
    return True


def weights_version(weights: Weights) -> str:
    """A hash of every model's checkpoint, dataset.json and plans.json: retrained or other weights get another
    version even under the same folder name, the same weights the same version wherever they are installed."""
    files = []
    for m in sorted(weights.models, key=lambda m: m.dataset):
        files += [m.checkpoint, m.path / "dataset.json", m.path / "plans.json"]
    return input_checksum(f for f in files if Path(f).is_file())[:16]


class Ledger:
    """Records of finished cases, one JSON file each, in ``OUT/ledger``."""

    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir) / LEDGER_DIR

    def path(self, case: str) -> Path:
        return self.folder / f"{case}.json"

    def write(self, record: dict) -> Path:
        return save_json(record, self.path(record["case"]))

    def read_one(self, case: str) -> dict | None:
        try:
            return json.loads(self.path(case).read_text())
        except (OSError, ValueError):
            return None

    def read(self) -> dict[str, dict]:
        """case -> record; a record that cannot be read is left out (the case is then done again)."""
        records = {}
        if not self.folder.is_dir():
            return records
        for p in sorted(self.folder.glob("*.json")):
            if p.name.startswith("."):
                continue
            try:
                rec = json.loads(p.read_text())
                records[rec["case"]] = rec
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"ledger record {p} is unreadable ({e}); that case will be done again", stacklevel=2)
        return records


def same_key(record: dict, key: dict) -> bool:
    """Whether a record was made under ``key`` (weights version, mode, regions)."""
    return all(record.get(k) == v for k, v in key.items())


def still_valid(record: dict | None, key: dict) -> bool:
    """Whether a record was made under ``key`` and needs no new run (its input's checksum aside)."""
    if not record or not same_key(record, key):
        return False
    return record.get("status") == "done" or record.get("failure") == FINAL_FAILURE


def finished_cases(cases: list, records: dict[str, dict], key_of, out_dir: Path, threads: int = 4) -> set[str]:
    """Names of the cases whose record is still valid, whose outputs are there unchanged and whose input is
    unchanged (checksums re-computed, in parallel, for those cases only)."""
    candidates = [c for c in cases if still_valid(records.get(c.name), key_of(c))
                  and records[c.name].get("path") == c.path and outputs_intact(out_dir, records[c.name])]
    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: reading and hashing overlap
        sums = list(pool.map(lambda c: input_checksum(c.files), candidates))
    return {c.name for c, s in zip(candidates, sums, strict=True) if records[c.name].get("checksum") == s}


def remove_stale_temporaries(out_dir: Path) -> int:
    """Temporary files that a killed worker left behind (write_atomic's ``.NAME.XXXX`` files); returns how many."""
    n = 0
    for folder in (Path(out_dir), Path(out_dir) / LEDGER_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            if name.startswith(".") and p.is_file() and any(
                    f"{tag}." in name for tag in ("_seg.nii.gz", "_structures.json", "_preview.png", ".json")):
                p.unlink(missing_ok=True)
                n += 1
    return n
