"""DICOM SEG size: BINARY (empty frames omitted) vs LABELMAP, on a real-size many-structure label map.

    .venv/bin/python bench/seg_size.py [--out DIR]

The label map is a composite of every phantom region (abdomen, pelvis, prostate, shoulder, knee,
spine: the catalogue's structures, each with a realistic extent), upsampled without interpolation to
a clinical grid (1.5 mm in-plane, 3 mm slices, 320 x 320 matrix) and stacked head to foot. It is
written as a DICOM MR series (tests/dicom_fixtures.write_series) and SEGs are made against it. Each SEG
is checked with dciodvfy (Debian dicom3tools) when it is on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mrannotator.catalogue import load_catalogue
from mrannotator.dicom import make_seg
from mrannotator.orientation import reorient_to, voxel_spacing
from mrannotator.phantoms import make_phantom
from mrannotator.testing.dicom_fixtures import read_series, write_series

REGIONS = ("spine", "shoulder", "abdomen", "pelvis", "prostate", "knee")
IN_PLANE, SLICE, MATRIX = 1.5, 3.0, 320


def composite() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    images, labels = [], []
    for region in REGIONS:
        ph = make_phantom(region, seed=0, orientation="LAS")
        img, aff, _ = reorient_to(np.asanyarray(ph.image.dataobj), ph.image.affine, ("L", "A", "S"))
        lab, _, _ = reorient_to(np.asanyarray(ph.labels.dataobj), ph.labels.affine, ("L", "A", "S"))
        zoom = np.array(voxel_spacing(aff)) / np.array([IN_PLANE, IN_PLANE, SLICE])
        img = ndimage.zoom(img, zoom, order=0)
        lab = ndimage.zoom(lab, zoom, order=0)
        canvas_i = np.zeros((MATRIX, MATRIX, img.shape[2]), np.int16)
        canvas_l = np.zeros((MATRIX, MATRIX, img.shape[2]), np.uint8)
        nx, ny = min(MATRIX, img.shape[0]), min(MATRIX, img.shape[1])
        ox, oy = (MATRIX - nx) // 2, (MATRIX - ny) // 2
        sx, sy = (img.shape[0] - nx) // 2, (img.shape[1] - ny) // 2
        canvas_i[ox:ox + nx, oy:oy + ny] = img[sx:sx + nx, sy:sy + ny]
        canvas_l[ox:ox + nx, oy:oy + ny] = lab[sx:sx + nx, sy:sy + ny]
        images.append(canvas_i)
        labels.append(canvas_l)
    affine = np.diag([-IN_PLANE, IN_PLANE, SLICE, 1.0])  # LAS
    affine[:3, 3] = [MATRIX * IN_PLANE / 2, -MATRIX * IN_PLANE / 2, 0.0]
    img = nib.Nifti1Image(np.concatenate(images[::-1], axis=2), affine)  # feet first in slice order
    lab = nib.Nifti1Image(np.concatenate(labels[::-1], axis=2), affine)
    return img, lab


def dciodvfy_errors(path: Path) -> int | None:
    if not shutil.which("dciodvfy"):
        return None
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return sum(line.startswith("Error") for line in r.stderr.splitlines())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="seg-size-"))
    img, lab = composite()
    write_series(img, out / "mr")
    datasets, vol = read_series(out / "mr")
    cat = load_catalogue()
    data = np.asanyarray(lab.dataobj)
    # the label map on the series' own grid (same storage here: LAS, slices in stored order)
    labels = nib.Nifti1Image(data, vol.affine)
    structures = [cat.by_id(i) for i in sorted(set(np.unique(data).tolist()) - {0})]
    print(f"grid {data.shape} ({IN_PLANE} x {IN_PLANE} x {SLICE} mm), {len(structures)} structures, "
          f"series {sum(f.stat().st_size for f in (out / 'mr').iterdir()) / 1e6:.1f} MB")
    weights = {"source": "demo", "models": ["composite"]}
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    t = time.perf_counter()
    seg = make_seg(labels, structures, datasets, weights=weights)
    f = out / "binary.dcm"
    seg.save_as(f)
    print(f"BINARY, empty frames omitted: {f.stat().st_size / 1e6:.2f} MB, {seg.NumberOfFrames} frames, "
          f"{time.perf_counter() - t:.1f} s, dciodvfy errors {dciodvfy_errors(f)}")
    # LABELMAP: same segment descriptions, one frame per slice, 8-bit segment numbers
    descriptions = list(seg.SegmentSequence)
    lut = np.zeros(256, np.uint8)
    for n, s in enumerate(structures, 1):
        lut[s.id] = n
    frames = lut[data].transpose(2, 1, 0)
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        t = time.perf_counter()
        lm = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type="LABELMAP",
            segment_descriptions=[hd.seg.SegmentDescription.from_dataset(d) for d in descriptions],
            series_instance_uid=hd.UID(), series_number=1001, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="MRAnnotator", manufacturer_model_name="MRAnnotator", software_versions="0.1.0",
            device_serial_number="0", transfer_syntax_uid=syntax,
        )
        f = out / f"labelmap_{syntax.name.replace(' ', '_')}.dcm"
        lm.save_as(f)
        print(f"LABELMAP {syntax.name}: {f.stat().st_size / 1e6:.2f} MB, {lm.NumberOfFrames} frames, "
              f"{time.perf_counter() - t:.1f} s, dciodvfy errors {dciodvfy_errors(f)}")
    print(f"files in {out}")


if __name__ == "__main__":
    main()
