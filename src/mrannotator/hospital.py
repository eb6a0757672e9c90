"""The CLI's hospital outputs: DICOM SEG + TID 1500 SR, C-STORE to a DICOM node, audit record.

    mrannotator segment -i DICOM_DIR -o OUT --dicom-results [--send AET@HOST:PORT] [--calling-ae AE]

writes OUT/CASE_seg.dcm, OUT/CASE_sr.dcm and OUT/CASE_audit.json next to the NIfTI and the statistics
JSON (the same SEG, SR and audit the MAP writes; ``mrannotator.dicom.results`` makes both), then sends the
SEG and SR when --send is given. A failed delivery keeps every file, records the outcome in the audit
record and exits with code 4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError


def add_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("hospital outputs (DICOM input only)")
    g.add_argument("--dicom-results", action="store_true",
                   help="also write CASE_seg.dcm (DICOM SEG), CASE_sr.dcm (TID 1500 volumes) and CASE_audit.json")
    g.add_argument("--send", metavar="AET@HOST:PORT", help="C-STORE the SEG and SR to this DICOM node "
                   "(implies --dicom-results); exit code 4 if they cannot be delivered")
    g.add_argument("--calling-ae", default=None, help="our AE title for --send (default MRANNOTATOR)")
    g.add_argument("--send-retries", type=int, default=3, help="further attempts after a failed send (default 3)")
    g.add_argument("--send-retry-delay", type=float, default=2.0, help="seconds between attempts (default 2)")


def prepare(args, src: Path):
    """Before the models load: (audit, destination) when hospital outputs are asked for, else None.
    Refuses a NIfTI input (no source instances for a SEG) and a malformed destination."""
    if not (args.dicom_results or args.send):
        return None
    from .audit import RunAudit
    from .dicom.store import Destination

    if not src.is_dir():
        raise InputError(f"--dicom-results / --send need a DICOM series folder as input, not {src}")
    destination = Destination.parse(args.send, args.calling_ae) if args.send else None
    audit = RunAudit(tool="cli")
    audit.record["input"] = {"path": str(src)}
    return audit, destination


def write_and_send(args, src: Path, image, result, segmenter, prepared, case: str, progress) -> None:
    """SEG + SR + audit (+ C-STORE); raises DeliveryError (exit code 4) when the delivery failed."""
    from .dicom import find_series
    from .dicom.results import audit_weights, checkpoint_digests, model_identity, write_dicom_results
    from .dicom.store import DeliveryError, send

    audit, destination = prepared
    out = Path(args.output)
    series = find_series(src).choose(args.series)  # the series load_image segmented (headers only)
    digests = checkpoint_digests(segmenter)
    model = model_identity(segmenter, digests)
    audit.source(series.header, str(src))
    audit.model(name=model.name, version=model.version, device_uid=model.device_uid,
                weights=audit_weights(segmenter, digests))
    audit.timed("segment", result.seconds)
    written = write_dicom_results(out, result, image, series.datasets, series.affine, input_root=src, model=model,
                                  prefix=f"{case}_")
    audit.outputs([{**w.as_dict(), "path": Path(w.path).name} for w in written])
    for w in written:
        progress(f"DICOM {w.kind} (series {w.series_number}) -> {w.path}")
    code, error = 0, None
    if destination is not None and written:
        progress(f"C-STORE to {destination.ae_title}@{destination.host}:{destination.port}")
        outcome = send([w.path for w in written], destination, retries=args.send_retries,
                       delay=args.send_retry_delay)
        audit.delivery(destination.as_dict(), outcome)
        audit.timed("send", outcome["seconds"])
        if outcome["status"] != "delivered":
            code, error = 4, f"results written to {out} but not delivered: {outcome['error']}"
    audit.finish(code, error)
    audit.write(out, name=f"{case}_audit.json")
    if error:
        raise DeliveryError(error)
