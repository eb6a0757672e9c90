"""``mrannotator batch``: the command line of :func:`mrannotator.batch.run_batch`.

Exit codes: 0 every case segmented (some may have nothing found: status ``empty``); 2 the batch finished but some
inputs were refused or failed (listed in failures.csv), or the input itself is unusable; 3 weights problem; 4 Ray
cluster problem (unreachable, auth token, version mismatch, INPUT / OUT not visible on the nodes); 130
interrupted (re-run to resume).
"""

from __future__ import annotations

import sys


def add_cli(subparsers) -> None:
    """Register ``mrannotator batch`` on the CLI's subparsers."""
    b = subparsers.add_parser("batch", help="segment a cohort (NIfTI folder, DICOM tree or CSV manifest) on Ray, "
                                            "resumable, with a cohort table")
    b.add_argument("-i", "--input", required=True,
                   help="folder of NIfTI files and/or DICOM studies, one NIfTI file, or a CSV with a 'path' column "
                        "(optional 'case_id')")
    b.add_argument("-o", "--output", required=True, help="output folder (per-case outputs, ledger, cohort tables)")
    b.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (the one started on this machine with `ray start`), "
                        "ray://HOST:PORT, or HOST:PORT; default RAY_ADDRESS, else a local Ray started here")
    b.add_argument("--workers", type=int, default=None,
                   help="worker processes, each holding the models once (default: as many as the cluster's CPUs "
                        "/ --threads-per-worker, or GPUs / --gpus-per-worker)")
    b.add_argument("--threads-per-worker", type=int, default=1, help="CPU threads (and Ray CPUs) per worker")
    b.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker (e.g. 1, or 0.5 for two workers per GPU); 0 runs on CPU")
    b.add_argument("--regions", nargs="+", default=None,
                   help="regions to run on every case, or 'auto' (default): DICOM series by their header keywords "
                        "(BodyPartExamined, descriptions, protocol), NIfTI files all regions")
    b.add_argument("--stack", metavar="KEY", default=None,
                   help="DICOM series of several 3D stacks: the one to segment in every such series, e.g. echo=2, "
                        "b=1000, time=3 (default: first echo, b=0, first time point; see `segment --stack`)")
    b.add_argument("--weights", default=None, help="weights folder (default: installed release, else demo)")
    b.add_argument("--fast", action="store_true", help="bf16 / fp16 inference (see `segment --fast`)")
    b.add_argument("--retry", type=int, default=2, help="times a case is retried when its worker process dies")
    b.add_argument("--preview", action="store_true", help="also write CASE_preview.png (three slices + labels)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--folder-names", action="store_true",
                   help="name DICOM cases after their folders (default: private names c0123456789, with the key "
                        "in OUT/private/names.csv, so that the tables carry no folder names such as patient IDs)")
    b.add_argument("--dry-run", action="store_true",
                   help="plan only: write OUT/plan.csv (every case found, refused with the reason) and exit")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .driver import run_batch

    regions = None if not args.regions or args.regions == ["auto"] else args.regions
    summary = run_batch(args.input, args.output, address=args.address, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, threads_per_worker=args.threads_per_worker,
                        regions=regions, fast=args.fast, retry=args.retry, quiet=args.quiet, preview=args.preview,
                        weights=args.weights, private=not args.folder_names, dry_run=args.dry_run,
                        stack=args.stack)
    if args.dry_run:
        print(f"{summary.total} cases planned, {summary.failed} refused, {summary.sidecars} sidecar files ignored; "
              f"plan in {summary.tables['plan']}", file=sys.stderr)
        return 0
    if not args.quiet:
        print(f"{summary.total} cases: {summary.already_done} done before, {summary.processed} processed now "
              f"({summary.workers} workers, {summary.seconds:.0f} s), {summary.empty} with nothing found, "
              f"{summary.failed} refused or failed (failures.csv), {summary.sidecars} sidecar files ignored; "
              f"tables in {summary.out_dir}", file=sys.stderr)
    return 2 if summary.failed else 0
