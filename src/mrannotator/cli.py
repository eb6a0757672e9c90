"""``mrannotator`` command line: segment, demo, weights, evaluate.

Exit codes: 0 success, 2 bad input, 3 weights problem, 1 anything else (with its message).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from .errors import MRAnnotatorError
from .evaluation import add_cli as add_evaluate_cli


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _case_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def write_outputs(result, out_dir: Path, case: str, source: str) -> tuple[Path, Path]:
    """Label NIfTI + structures JSON, each written atomically (no partial file on failure)."""
    from .imageio import save_json, save_nifti

    report = {"input": source, **result.summary()}
    seg_path = save_nifti(result.labels, out_dir / f"{case}_seg.nii.gz")
    json_path = save_json(report, out_dir / f"{case}_structures.json")
    return seg_path, json_path


def cmd_segment(args) -> int:
    from .engine import Segmenter
    from .imageio import load_image

    progress = _Progress(args.quiet)
    src = Path(args.input)
    image = load_image(src, series_uid=args.series)  # bad input fails here, before minutes of model loading
    progress(f"read {src}: {image.shape} voxels")
    progress("loading models")
    seg = Segmenter(weights=args.weights, device=args.device, threads=args.threads,
                    tile_step_size=args.step_size, regions=args.regions, mode="fast" if args.fast else "exact",
                    skip_absent_regions=args.skip_absent_regions)
    progress(f"weights: {seg.weights.source} ({seg.weights.root}); models: "
             f"{', '.join(m.dataset for m in seg.models)}")
    result = seg.segment(image, structures=args.structures, progress=progress)
    seg_path, json_path = write_outputs(result, Path(args.output), _case_name(src), str(src))
    progress(f"{len(result.structures)} structures found in {result.seconds:.1f} s -> {seg_path}, {json_path}")
    if not args.quiet:
        for row in result.summary()["structures"]:
            print(f"{row['id']:4d}  {row['name']:<22s} {row['voxels']:9d} voxels  {row['volume_ml']:10.2f} ml")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(Path(args.output), weights=args.weights, device=args.device, quiet=args.quiet)
    print(report["text"])
    return 0 if report["ok"] else 1


def cmd_weights(args) -> int:
    from . import weights as w

    if args.action == "install":
        inst = w.install(Path(args.path), allow_unknown_labels=args.allow_unknown_labels)
        print(f"installed {', '.join(m.dataset for m in inst.models)} into {inst.root}")
        return 0
    rows = w.list_weights()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            flag = "*" if r.get("active") else " "
            intact = "" if "intact" not in r else (" (checksums OK)" if r["intact"] else " (CHECKSUM MISMATCH)")
            print(f"{flag} {r['source']:<9s} {r['root']}{intact}\n    {', '.join(r['models'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrannotator", description="MRI multi-structure segmentation (nnU-Net v2)")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment one MR volume (NIfTI file or DICOM series folder)")
    s.add_argument("-i", "--input", required=True, help="NIfTI file or folder with one DICOM MR series")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--series", metavar="UID", help="DICOM folder: segment this SeriesInstanceUID (default: the "
                   "largest acceptable MR series)")
    s.add_argument("--regions", nargs="+", help="regions to run (abdomen, pelvis, prostate, shoulder, knee, "
                   "cervical_spine, thoracic_spine, lumbar_spine, spine); default all")
    s.add_argument("--structures", nargs="+", help="only these structures (catalogue names)")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    s.add_argument("--step-size", type=float, default=0.5, help="sliding-window tile step (fraction of patch)")
    s.add_argument("--weights", default=None, help="weights folder (default: installed release, else demo)")
    s.add_argument("--fast", action="store_true",
                   help="bf16 (CPU with native bf16) / fp16 (CUDA): faster, labels may differ at close calls")
    s.add_argument("--skip-absent-regions", action="store_true",
                   help="skip a region model whose coarse pass (a covering subset of its tiles) finds none of its "
                        "structures")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", help="phantom per region -> segment with the demo weights -> Dice report")
    d.add_argument("-o", "--output", default="mrannotator-demo", help="output folder")
    d.add_argument("--weights", default=None)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("weights", help="install or list model weights")
    wsub = w.add_subparsers(dest="action", required=True)
    wi = wsub.add_parser("install", help="validate and install the official release (zip or folder)")
    wi.add_argument("path")
    wi.add_argument("--allow-unknown-labels", action="store_true",
                    help="install although dataset.json has labels the catalogue does not know")
    wl = wsub.add_parser("list", help="installed and demo weights")
    wl.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_weights)

    add_evaluate_cli(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if getattr(args, "quiet", False):
                warnings.simplefilter("ignore")
                logging.getLogger("mrannotator").setLevel(logging.ERROR)
            return args.func(args)
    except MRAnnotatorError as e:
        print(f"mrannotator: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mrannotator: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
