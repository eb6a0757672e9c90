"""Infer latency through the PACS vs. a local datastore, same volume, same server code, same model.

    PYTHONPATH=src .venv/bin/python bench/pacs_latency.py [--runs 3] [--model mrannotator] [--out FILE]

The real MR sample (../shared/data/real_mr) is written as a DICOM MR series and stored in a real
Orthanc (scripts/orthanc.py); one MONAI Label server serves it over DICOMweb, another serves
the same volume (as read back from the series) from a local studies folder; both run at once and
their requests alternate (cold PACS, local, warm PACS per round). POST /infer is timed
from the client: "cold" = the series is not in the server's cache (fetched from the PACS and
converted in the request; the cache is emptied before each such run), "warm" = cached. The ratio
PACS/local of the median request times is the figure of merit (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]

from mrannotator.testing import orthanc_support  # noqa: E402
from mrannotator.testing.dicom_fixtures import read_series, write_series  # noqa: E402


def _infer(url: str, model: str, image: str) -> float:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/{model}?image={image}", data={"params": "{}"}, timeout=900)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default="mrannotator")
    p.add_argument("--image", default=str(ROOT.parent / "shared" / "data" / "real_mr" / "example_mr_sm.nii.gz"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pacs_latency.json"))
    a = p.parse_args()
    why = orthanc_support.missing()
    if why:
        print(f"cannot run: {why}")
        return 2
    weights = ROOT / "models" / "demo"
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        tmp = Path(tmp)
        src = nib.load(a.image)
        data = np.asanyarray(src.dataobj)
        image = nib.Nifti1Image(np.round(data).astype(np.int16), src.affine)
        write_series(image, tmp / "series", series_description="real MR (bench)")
        datasets, volume = read_series(tmp / "series")
        uid = str(datasets[0].SeriesInstanceUID)
        (tmp / "studies").mkdir()
        nib.save(volume, tmp / "studies" / "real_mr.nii.gz")
        result = {"model": a.model, "image": Path(a.image).name, "shape": list(volume.shape), "runs": a.runs}
        (tmp / "pacs_server").mkdir()
        (tmp / "local_server").mkdir()
        # both servers up at once and their requests interleaved: on a shared machine the load changes
        # over minutes, and a fair ratio needs both sides measured under the same load
        with orthanc_support.running_orthanc(tmp / "orthanc") as pacs, \
                orthanc_support.running_monailabel(pacs.dicomweb_url, tmp / "pacs_server", weights,
                                                   env=pacs.env()) as remote, \
                orthanc_support.running_monailabel(str(tmp / "studies"), tmp / "local_server", weights) as local_srv:
            orthanc_support.store_files(pacs, sorted((tmp / "series").iterdir()))
            _infer(remote["url"], a.model, uid)  # first requests: model warm-up, not counted
            _infer(local_srv["url"], a.model, "real_mr")
            cold, warm, local = [], [], []
            for _ in range(a.runs):
                for sub in ("images", "series"):
                    for d in remote["cache"].glob(f"*/{sub}"):
                        shutil.rmtree(d)
                        d.mkdir()
                cold.append(_infer(remote["url"], a.model, uid))
                local.append(_infer(local_srv["url"], a.model, "real_mr"))
                warm.append(_infer(remote["url"], a.model, uid))
    med = {k: statistics.median(v) for k, v in (("pacs_cold", cold), ("pacs_warm", warm), ("local", local))}
    result.update({
        "seconds": {"pacs_cold": cold, "pacs_warm": warm, "local": local},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_cold": round(med["pacs_cold"] / med["local"], 3),
        "ratio_warm": round(med["pacs_warm"] / med["local"], 3),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
    })
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
