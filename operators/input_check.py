"""The app's input, checked before anything heavy is imported (MONAI Deploy, Holoscan, torch, the models).

``python operators`` runs :func:`selected` first, with the same ``mrannotator.dicom`` rules as the CLI: a
study the CLI refuses is refused here with the same message and exit code, at about the CLI's cost. The
selector operator takes the series chosen here (the folder is not scanned twice).

Settings (environment): MRANNOTATOR_SERIES=UID (default: the largest acceptable MR series),
MRANNOTATOR_STACK=KEY (e.g. echo=2, b=1000, time=3; default the first stack),
MRANNOTATOR_IGNORE_INSTANCE_GAPS=1 (accept a stack missing its first / last InstanceNumber).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from mrannotator.dicom import Series, SeriesScan, find_series, report

_SELECTED: dict[tuple, tuple[SeriesScan, Series]] = {}


def options() -> dict:
    """The reading options the environment sets (the CLI's --series, --stack, --ignore-instance-gaps)."""
    ignore = os.environ.get("MRANNOTATOR_IGNORE_INSTANCE_GAPS", "").strip().lower() in ("1", "true", "yes")
    return {"series_uid": os.environ.get("MRANNOTATOR_SERIES") or None,
            "stack": os.environ.get("MRANNOTATOR_STACK") or None, "ignore_instance_gaps": ignore}


def input_path(argv: list[str]) -> Path:
    """-i / --input, else HOLOSCAN_INPUT_PATH, else ./input (as the MONAI Deploy SDK resolves it)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--input")
    given = parser.parse_known_args(argv[1:])[0].input
    return Path(given or os.environ.get("HOLOSCAN_INPUT_PATH") or "input")


def selected(folder: Path, series_uid: str | None = None, log: logging.Logger | None = None) -> Series:
    """The series to segment under ``folder`` with the environment's options; InputError naming why not.

    Scanned once per process: a second call (the selector operator's) logs the scan and returns the same series.
    """
    opts = options()
    uid = series_uid or opts["series_uid"]
    key = (str(Path(folder).absolute()), uid, opts["stack"], opts["ignore_instance_gaps"])
    if key not in _SELECTED:
        scan = find_series(folder, stack=opts["stack"], ignore_instance_gaps=opts["ignore_instance_gaps"])
        _SELECTED[key] = (scan, scan.choose(uid))
    scan, series = _SELECTED[key]
    if log is not None:
        report(scan, log)
    return series
