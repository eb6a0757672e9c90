"""The built MAP image against ``python operators`` on the same DICOM folder: SEG voxels, segments, time.

    PYTHONPATH=src .venv/bin/python bench/map_image.py -i DICOM_DIR [--tag localhost/mrannotator:0.1.0-cpu]
        [--work build/image] [--local-out DIR] [--json bench/results/map_image.json]

Needs the image from ``packaging/image.py build`` (the same ``--work``). Runs the app twice on DICOM_DIR, each a
fresh process: on the host (``python operators -i DIR -o OUT -m models/demo``, MRANNOTATOR_DEVICE=cpu) and in
the image (``packaging/image.py run -i DIR -o OUT``: ``buildah run --isolation chroot``, the image's own
models, venv and MAP environment). ``--local-out`` reuses a host run's output folder instead of running it.
Both SEGs are read back to label maps on the source series' grid (highdicom, per source instance) and
compared voxel for voxel; so are the labels NIfTI files, the segment lists and the SR's measurement values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("mrannotator_seg.dcm", "mrannotator_sr.dcm", "mrannotator_labels.nii.gz", "mrannotator_structures.json")


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"command": " ".join(cmd), "exit": code, "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}


def segments(seg) -> list[tuple[int, str, str]]:
    return [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            for s in seg.SegmentSequence]


def sr_values(path: Path) -> list[tuple[str, float]]:
    """(concept, value) of every numeric measurement in the SR's content tree."""
    out = []

    def walk(items):
        for it in items:
            if it.ValueType == "NUM":
                out.append((it.ConceptNameCodeSequence[0].CodeMeaning,
                            float(it.MeasuredValueSequence[0].NumericValue)))
            walk(getattr(it, "ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def compare(source: Path, local: Path, image: Path) -> dict:
    from mrannotator.dicom.seg_read import labels_from_seg
    from mrannotator.testing.dicom_fixtures import read_series

    datasets, _ = read_series(source)
    seg_a, seg_b = (pydicom.dcmread(d / OUTPUTS[0]) for d in (local, image))
    a = np.asanyarray(labels_from_seg(seg_a, datasets).dataobj)
    b = np.asanyarray(labels_from_seg(seg_b, datasets).dataobj)
    na, nb = (np.asanyarray(nib.load(d / OUTPUTS[2]).dataobj) for d in (local, image))
    stats_a, stats_b = (json.loads((d / OUTPUTS[3]).read_text())["structures"] for d in (local, image))
    return {
        "grid": list(a.shape), "foreground_voxels_local": int((a > 0).sum()),
        "structures_local": len(stats_a), "structures_image": len(stats_b),
        "seg_voxels_differing": int((a != b).sum()) if a.shape == b.shape else None,
        "labels_nifti_voxels_differing": int((na != nb).sum()) if na.shape == nb.shape else None,
        "same_segments": segments(seg_a) == segments(seg_b),
        "same_seg_frames": seg_a.NumberOfFrames == seg_b.NumberOfFrames and seg_a.PixelData == seg_b.PixelData,
        "same_sr_values": sr_values(local / OUTPUTS[1]) == sr_values(image / OUTPUTS[1]),
        "same_structure_volumes": [(r["id"], r["voxels"]) for r in stats_a]
        == [(r["id"], r["voxels"]) for r in stats_b],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-i", "--input", type=Path, required=True)
    ap.add_argument("-t", "--tag", default="localhost/mrannotator:0.1.0-cpu")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "image")
    ap.add_argument("--local-out", type=Path, default=None, help="a finished host run's output folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")}
    env["MRANNOTATOR_DEVICE"] = "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="map_image_", dir=ROOT / "build"))
    record = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
              "input": str(args.input.resolve()), "tag": args.tag}
    local = args.local_out
    if local is None:
        local = tmp / "local"
        record["local"] = timed([sys.executable, str(ROOT / "operators"), "-i", str(args.input), "-o", str(local),
                                 "-m", str(ROOT / "models" / "demo")], env, tmp / "local.log")
    record["image"] = timed([sys.executable, str(ROOT / "packaging" / "image.py"), "run", "-i", str(args.input),
                             "-o", str(tmp / "image"), "-t", args.tag, "--work", str(args.work)],
                            env, tmp / "image.log")
    record["outputs_image"] = sorted(p.name for p in (tmp / "image").iterdir())
    if record["image"]["exit"] == 0:
        record["compare"] = compare(args.input, local, tmp / "image")
    else:
        record["image"]["error"] = (tmp / "image.log").read_text(errors="replace").strip().splitlines()[-4:]
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    ok = record.get("compare", {}).get("seg_voxels_differing") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
