"""Mirrored-label check (issue 19): detection on mirrored exports, false alarms on honest corrections.

For every series of the geometry matrix (mrannotator.testing.mirror_support.MATRIX: axial, sagittal, coronal,
oblique; instance numbers increasing and decreasing along the slice normal; head / feet first):

- the proposal is the demo abdomen model's result on the series (the engine, as the server infers);
- honest corrections: edits of the proposal changing 1-30 % of its labelled voxels (blob added or
  removed, a structure dilated or eroded, deleted, a structure added), stored as a SEG by the project's
  writer and read back as the server reads a SEG;
- mirrored exports: each correction written as OHIF's export writes it on an affected series (frames
  in reverse slice order, positions and references right; highdicom) and read back the same way.

Each read-back label goes through :func:`mrannotator.mirror.check_mirrored` with the proposal and the
image (what the server does), and with the image only (a series never inferred). Results:
bench/results/mirror_check.json.

    PYTHONPATH=src .venv/bin/python bench/mirror_check.py [--per-series 3] [--weights models/demo]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _read_back(seg, entry):
    from mrannotator.dicom import labels_from_seg

    return np.asanyarray(labels_from_seg(seg, entry["datasets"]).dataobj)


def _corrections(proposal, rng, count, ms):
    """``count`` honest corrections of ``proposal`` (kind, share, label), each changing 1-30 % of it."""
    out = []
    kinds = list(ms.EDITS)
    n = 0
    while len(out) < count and n < 50 * count:
        kind = kinds[n % len(kinds)]
        n += 1
        label = ms.honest_correction(proposal, kind, rng, share=float(rng.uniform(0.01, 0.3)))
        share = ms.edited_share(proposal, label)
        if 0.01 <= share <= 0.30:
            out.append((kind, share, label))
    return out


def _row(case, kind, share, mirrored_export, label, proposal, image):
    from mrannotator.mirror import check_mirrored

    full = check_mirrored(label, proposal, image)
    image_only = check_mirrored(label, None, image)
    return {"series": case, "edit": kind, "edited_share": round(share, 4), "mirrored_export": mirrored_export,
            "verdict": full.as_dict(), "image_only": image_only.as_dict()}


def run(weights: Path, per_series: int, seed: int) -> dict:
    import nibabel as nib
    import pydicom

    from mrannotator import Segmenter
    from mrannotator.catalogue import load_catalogue
    from mrannotator.dicom import make_seg
    from mrannotator.testing import mirror_support as ms
    from mrannotator.testing.mirror_support import MATRIX, case_name, mirrored_seg, write_matrix_series

    segmenter = Segmenter(weights=weights, device="cpu", regions=["abdomen"])
    structures = list(load_catalogue())
    rng = np.random.default_rng(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study = pydicom.uid.generate_uid()
        for n, case in enumerate(MATRIX):
            entry = write_matrix_series(Path(tmp), *case, seed=seed + n, series_number=n + 1, study_uid=study)
            name = case_name(*case)
            t0 = time.perf_counter()
            proposal = np.asanyarray(segmenter.segment(entry["volume"]).labels.dataobj).astype(np.uint8)
            print(f"{name}: proposal in {time.perf_counter() - t0:.1f} s", flush=True)
            image = np.asanyarray(entry["volume"].dataobj)
            for kind, share, label in _corrections(proposal, rng, per_series, ms):
                img = nib.Nifti1Image(label, entry["volume"].affine)
                honest = _read_back(make_seg(img, structures, entry["datasets"], weights={"source": "annotator"}),
                                    entry)
                assert np.array_equal(honest, label), "the project's SEG must round-trip exactly"
                rows.append(_row(name, kind, share, False, honest, proposal, image))
                mirrored = _read_back(mirrored_seg(entry["datasets"], img), entry)
                assert np.array_equal(mirrored, label[:, :, ::-1])
                rows.append(_row(name, kind, share, True, mirrored, proposal, image))
    return {"rows": rows, "summary": _summary(rows)}


def _summary(rows) -> dict:
    def count(basis_key, mirrored_export):
        sel = [r for r in rows if r["mirrored_export"] == mirrored_export]
        flagged = sum(1 for r in sel if r[basis_key]["mirrored"])
        undecided = sum(1 for r in sel if r[basis_key]["mirrored"] is None)
        return {"cases": len(sel), "flagged": flagged, "undecided": undecided}

    def spread(basis_key, mirrored_export):  # how close the cases came to the decision
        sel = [r[basis_key] for r in rows if r["mirrored_export"] == mirrored_export and r[basis_key]["as_is"]
               is not None]
        return {"as_is": [min(v["as_is"] for v in sel), max(v["as_is"] for v in sel)],
                "reversed": [min(v["reversed"] for v in sel), max(v["reversed"] for v in sel)]} if sel else {}

    return {"with_proposal": {"mirrored": count("verdict", True), "honest": count("verdict", False),
                              "range_mirrored": spread("verdict", True), "range_honest": spread("verdict", False)},
            "image_only_ranges": {"mirrored": spread("image_only", True), "honest": spread("image_only", False)},
            "image_only": {"mirrored": count("image_only", True), "honest": count("image_only", False)},
            "edited_share_range": [min(r["edited_share"] for r in rows), max(r["edited_share"] for r in rows)],
            "basis_used": sorted({r["verdict"]["basis"] for r in rows})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--per-series", type=int, default=3, help="honest corrections per series (8 series)")
    parser.add_argument("--seed", type=int, default=19000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mirror_check.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run(args.weights, args.per_series, args.seed)
    result["meta"] = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": platform.platform(), "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
