"""``mrannotator`` command line: segment, demo, weights, evaluate, batch, finetune.

Exit codes: 0 success, 2 bad input or unusable output folder, 3 weights problem, 1 anything else (with its message).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from . import hospital
from .batch.cli import add_cli as add_batch_cli
from .catalogue import region_names
from .errors import MRAnnotatorError
from .finetune_cli import add_finetune_cli
from .outputs import check_output_dir, output_paths, write_outputs  # noqa: F401 (re-exported)


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cmd_segment(args) -> int:
    from .engine import Segmenter
    from .imageio import case_name, load_image

    progress = _Progress(args.quiet)
    src = Path(args.input)
    image = load_image(src, series_uid=args.series, stack=args.stack,  # bad input fails here, before model loading
                       ignore_instance_gaps=args.ignore_instance_gaps)
    check_output_dir(Path(args.output), case_name(src))
    prepared = hospital.prepare(args, src)  # DICOM SEG / SR / C-STORE asked for: checked before the models load
    progress(f"read {src}: {image.shape} voxels")
    progress("loading models")
    seg = Segmenter(weights=args.weights, device=args.device, threads=args.threads,
                    tile_step_size=args.step_size, regions=args.regions, mode="fast" if args.fast else "exact",
                    skip_absent_regions=args.skip_absent_regions)
    progress(f"weights: {seg.weights.source} ({seg.weights.root}); models: "
             f"{', '.join(m.dataset for m in seg.models)}")
    result = seg.segment(image, structures=args.structures, progress=progress)
    seg_path, json_path = write_outputs(result, Path(args.output), case_name(src), str(src))
    if prepared:
        hospital.write_and_send(args, src, image, result, seg, prepared, case_name(src), progress)
    if args.preview:
        from .preview import write_preview

        write_preview(image, result.labels, Path(args.output) / f"{case_name(src)}_preview.png", result.structures,
                      title=case_name(src))
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


def cmd_evaluate(args) -> int:
    from .evaluation import Evaluation, comparison_markdown, evaluate, format_ci, region_title, skipped_summary
    from .imageio import write_atomic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's empty-mask warnings; empty sides are handled and reported
        ev = evaluate(args.pred, args.truth, truth_labels=args.truth_labels, pred_labels=args.pred_labels,
                      structures=args.structures, set_name=args.set_name, seed=args.seed)
        paths = ev.write(args.out, figure=not args.no_figure)
        if args.compare:
            text = comparison_markdown([*(Evaluation.load(p) for p in args.compare), ev])
            paths["comparison"] = write_atomic(Path(args.out) / "comparison.md", lambda tmp: Path(tmp).write_text(text))
    print(f"{'region':<16s} {'structures':>10s} {'cases':>6s}  Dice mean (95% CI)")
    for r in ev.regions:
        print(f"{region_title(r['region']):<16s} {r['structures']:>10d} {r['cases']:>6d}  "
              f"{format_ci(r['dice_mean'], r['dice_ci_low'], r['dice_ci_high'])} [{r['ci_method']}]")
    for line in skipped_summary(ev.skipped):
        print(f"mrannotator: skipped {line}", file=sys.stderr)
    print(f"{ev.n_cases} cases evaluated; report: {paths['markdown']}; tables: "
          f"{', '.join(str(paths[k]) for k in ('cases', 'structures', 'regions'))}"
          + (f"; figure: {paths['figure']}" if "figure" in paths else "")
          + (f"; comparison: {paths['comparison']}" if "comparison" in paths else ""))
    return 0


def _add_segment(sub) -> None:
    s = sub.add_parser("segment", help="segment one MR volume (NIfTI file or DICOM series folder)")
    s.add_argument("-i", "--input", required=True, help="NIfTI file, DICOM folder, DICOMDIR or DICOM file")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--series", metavar="UID", help="DICOM folder: segment this SeriesInstanceUID (default: the "
                   "largest acceptable MR series)")
    s.add_argument("--stack", metavar="KEY", help="DICOM series of several 3D stacks: the one to segment, e.g. "
                   "echo=2, b=1000, time=3, acquisition=2 (default: first echo, b=0, first time point)")
    s.add_argument("--ignore-instance-gaps", action="store_true", help="DICOM: accept a stack whose "
                   "InstanceNumbers miss the first or last slice (e.g. renumbered by an export)")
    s.add_argument("--regions", nargs="+", help=f"regions to run ({', '.join(region_names())}); default all")
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
    s.add_argument("--preview", action="store_true", help="also write CASE_preview.png (three slices + labels)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    hospital.add_options(s)
    s.set_defaults(func=cmd_segment)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="phantom per region -> segment with the demo weights -> Dice report")
    d.add_argument("-o", "--output", default="mrannotator-demo", help="output folder")
    d.add_argument("--weights", default=None)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def _add_weights(sub) -> None:
    w = sub.add_parser("weights", help="install or list model weights")
    wsub = w.add_subparsers(dest="action", required=True)
    wi = wsub.add_parser("install", help="validate and install the official release (zip or folder)")
    wi.add_argument("path")
    wi.add_argument("--allow-unknown-labels", action="store_true",
                    help="install although dataset.json has labels the catalogue does not know")
    wl = wsub.add_parser("list", help="installed and demo weights")
    wl.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_weights)


def _add_evaluate(sub) -> None:
    from .evaluation.labelmaps import BUILTIN_LABEL_MAPS

    e = sub.add_parser("evaluate", help="Dice / HD95 / ASD of predictions against truth, paper-style tables")
    e.add_argument("--pred", required=True, help="folder of predicted label maps (or one file)")
    e.add_argument("--truth", required=True, help="folder of reference label maps, same file names (or one file)")
    e.add_argument("--truth-labels", default=None,
                   help="label map of the truth files: CSV/JSON value -> catalogue structure, an nnU-Net dataset.json, "
                        f"or a built-in name ({', '.join(BUILTIN_LABEL_MAPS)}); default: catalogue ids")
    e.add_argument("--pred-labels", default=None, help="label map of the prediction files (as --truth-labels)")
    e.add_argument("--structures", nargs="+", default=None, help="only these structures (catalogue names or ids)")
    e.add_argument("--out", default="mrannotator-evaluation", help="output folder (CSV, Markdown, JSON, PNG)")
    e.add_argument("--set-name", default="test", help="name of the test set in the report, e.g. internal, external")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    e.add_argument("--no-figure", action="store_true", help="do not draw the Dice figure")
    e.add_argument("--compare", nargs="+", default=None, metavar="EARLIER",
                   help="earlier evaluation folders (or their evaluation.json): also write comparison.md with one "
                        "Dice column per set, e.g. the original model next to a fine-tuned one")
    e.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mrannotator", description="MRI multi-structure segmentation (nnU-Net v2)")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_segment, _add_demo, _add_weights, _add_evaluate, add_batch_cli, add_finetune_cli):
        add(sub)
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
