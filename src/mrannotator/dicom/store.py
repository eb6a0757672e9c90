"""C-STORE of the results (SEG + SR) to a configured DICOM node, with retries and an outcome record.

    dest = Destination.parse("PACS@10.0.0.5:104")          # or destination_from_env()
    outcome = send(files, dest)                             # never raises for network/peer failures
    outcome["status"] in ("delivered", "failed")

The MAP reads MRANNOTATOR_DICOM_DEST=AET@HOST:PORT (or MRANNOTATOR_DICOM_AE / _HOST / _PORT), with
MRANNOTATOR_DICOM_CALLING_AE (default MRANNOTATOR), MRANNOTATOR_DICOM_RETRIES (default 3) and
MRANNOTATOR_DICOM_RETRY_DELAY (seconds, default 2). The CLI has the same as options (--send ...).
Files that were accepted are not sent again on a retry; the outcome lists every file with its last
status and every attempt with its error (association refused/aborted, connection refused, timeout,
a non-success C-STORE status).
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError, MRAnnotatorError

DEFAULT_CALLING_AE = "MRANNOTATOR"
_DEST = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class DeliveryError(MRAnnotatorError):
    """The results were written but could not be delivered to the configured DICOM node."""

    exit_code = 4


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    calling_ae: str = DEFAULT_CALLING_AE

    def __post_init__(self):
        for what, ae in (("AE title", self.ae_title), ("calling AE title", self.calling_ae)):
            if not _AE.match(ae) or not ae.strip():
                raise InputError(f"DICOM destination: {what} {ae!r} must be 1-16 printable characters, no backslash")
        if not 0 < int(self.port) < 65536:
            raise InputError(f"DICOM destination: port {self.port} is not in 1-65535")

    @classmethod
    def parse(cls, text: str, calling_ae: str | None = None) -> Destination:
        m = _DEST.match(text.strip())
        if not m:
            raise InputError(f"DICOM destination {text!r}: expected AETITLE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(m["ae"], m["host"], int(m["port"]), calling_ae or DEFAULT_CALLING_AE)

    def as_dict(self) -> dict:
        return asdict(self)


def destination_from_env(env=os.environ) -> Destination | None:
    """The MAP's destination from its environment, or None when none is configured."""
    calling = env.get("MRANNOTATOR_DICOM_CALLING_AE") or None
    if env.get("MRANNOTATOR_DICOM_DEST"):
        return Destination.parse(env["MRANNOTATOR_DICOM_DEST"], calling)
    parts = [env.get(f"MRANNOTATOR_DICOM_{k}") for k in ("AE", "HOST", "PORT")]
    if not any(parts):
        return None
    if not all(parts):
        raise InputError("DICOM destination: set all of MRANNOTATOR_DICOM_AE, _HOST and _PORT (or _DEST)")
    if not parts[2].isdigit():
        raise InputError(f"DICOM destination: MRANNOTATOR_DICOM_PORT {parts[2]!r} is not a number")
    return Destination(parts[0], parts[1], int(parts[2]), calling or DEFAULT_CALLING_AE)


def retry_settings(env=os.environ) -> tuple[int, float]:
    try:
        return int(env.get("MRANNOTATOR_DICOM_RETRIES", 3)), float(env.get("MRANNOTATOR_DICOM_RETRY_DELAY", 2))
    except ValueError as e:
        raise InputError(f"MRANNOTATOR_DICOM_RETRIES / _RETRY_DELAY: {e}") from e


def _reachable(dest: Destination, timeout: float) -> str | None:
    """None when a TCP connection to the node opens, else why not (refused, unreachable, timed out, bad name)."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            return None
    except socket.gaierror as e:
        return f"host {dest.host!r} not found ({e.strerror or e})"
    except ConnectionRefusedError:
        return f"connection refused by {dest.host}:{dest.port} (no DICOM node listening)"
    except TimeoutError:
        return f"no answer from {dest.host}:{dest.port} within {timeout:g} s (unreachable or filtered)"
    except OSError as e:
        return f"cannot connect to {dest.host}:{dest.port}: {e.strerror or e}"


def _one_attempt(datasets: dict, pending: list[str], dest: Destination, timeout: float) -> tuple[dict, str | None]:
    """Send ``pending`` files in one association: ({file: status text}, association-level error or None)."""
    from pynetdicom import AE

    unreachable = _reachable(dest, timeout)
    if unreachable:
        return {}, unreachable
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(datasets[f].SOPClassUID) for f in pending}):
        ae.add_requested_context(sop_class)  # default transfer syntaxes; the files are explicit VR little endian
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = ("association rejected by the node" if assoc.is_rejected else
               "association aborted by the node" if assoc.is_aborted else
               "no association (connection refused, unreachable or timed out)")
        return {}, f"{why} ({dest.ae_title}@{dest.host}:{dest.port})"
    statuses = {}
    try:
        for f in pending:
            status = assoc.send_c_store(datasets[f])
            code = getattr(status, "Status", None)
            statuses[f] = "stored" if code == 0x0000 else (
                f"C-STORE status 0x{code:04X}" if code is not None else "no C-STORE response (timeout or abort)")
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses, None


def send(files: list[str | Path], dest: Destination, retries: int = 3, delay: float = 2.0,
         timeout: float = 30.0) -> dict:
    """C-STORE every file to ``dest``; up to ``retries`` further attempts for what was not stored."""
    import pydicom

    names = [str(f) for f in files]
    datasets = {f: pydicom.dcmread(f) for f in names}
    status = dict.fromkeys(names, "not sent")
    attempts = []
    t0 = time.perf_counter()
    for n in range(1, retries + 2):
        pending = [f for f in names if status[f] != "stored"]
        if not pending:
            break
        if n > 1:
            time.sleep(delay)
        try:
            got, error = _one_attempt(datasets, pending, dest, timeout)
        except (OSError, RuntimeError, ValueError) as e:
            got, error = {}, f"{type(e).__name__}: {e}"
        status.update(got)
        failed = {Path(f).name: s for f, s in got.items() if s != "stored"}
        attempts.append({"attempt": n, "error": error, "failed": failed or None})
    ok = all(s == "stored" for s in status.values())
    return {
        "status": "delivered" if ok else "failed",
        "files": [{"file": Path(f).name, "sop_instance_uid": str(datasets[f].SOPInstanceUID), "status": status[f]}
                  for f in names],
        "attempts": attempts,
        "seconds": round(time.perf_counter() - t0, 3),
        "error": None if ok else (attempts[-1]["error"] or f"not stored: {attempts[-1]['failed']}"),
    }
