"""A real Orthanc (Debian's, + DICOMweb plugin) and a real MONAI Label server on it, for tests and benches.

Both bind 127.0.0.1, live in a temp folder and are stopped by PID. Orthanc is started by
``scripts/orthanc.py`` (the same script users run), so the tests exercise the documented set-up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mrannotator_orthanc_script", ROOT / "scripts" / "orthanc.py")
orthanc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = orthanc  # dataclasses look their module up by name
_spec.loader.exec_module(orthanc)


def missing() -> str | None:
    return orthanc.missing()


@contextlib.contextmanager
def running_orthanc(workdir: Path) -> Iterator:
    server = orthanc.start(workdir, dicom=False)
    try:
        yield server
    finally:
        orthanc.stop(server)


def store_files(server, files) -> list[dict]:
    """Store DICOM files in Orthanc through its REST API (as a modality's upload would)."""
    out = []
    for f in files:
        r = requests.post(f"{server.url}/instances", data=Path(f).read_bytes(), headers=server.auth_header(),
                          timeout=30)
        r.raise_for_status()
        out.append(r.json())
    return out


def dicomweb(server):
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    return DICOMwebClient(server.dicomweb_url, session=create_session_from_user_pass(server.username,
                                                                                      server.password))


def seg_series(server, referenced_series: str | None = None) -> list[str]:
    """SEG series uids in Orthanc (QIDO), optionally only those referencing one image series."""
    client = dicomweb(server)
    uids = []
    for js in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, uid = js["0020000D"]["Value"][0], js["0020000E"]["Value"][0]
        if referenced_series:
            from pydicom import Dataset

            meta = Dataset.from_json(client.retrieve_series_metadata(study, uid)[0])
            if str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID) != referenced_series:
                continue
        uids.append(uid)
    return sorted(uids)


@contextlib.contextmanager
def running_monailabel(studies: str, root: Path, weights: Path, env: dict | None = None,
                       conf: dict | None = None, timeout: float = 240) -> Iterator[dict]:
    """``monailabel start_server --app apps/mrannotator --studies STUDIES`` on a free loopback port."""
    from monailabel.client import MONAILabelClient

    port = orthanc.free_port()
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"), "nnUNet_n_proc_DA": "0", **(env or {})}
    model_dir = root / "model"
    cmd = [str(venv_bin / "monailabel"), "start_server", "--app", str(ROOT / "apps" / "mrannotator"),
           "--studies", studies, "--host", "127.0.0.1", "--port", str(port),
           "--conf", "weights", str(weights), "--conf", "device", "cpu", "--conf", "model_dir", str(model_dir)]
    for k, v in (conf or {}).items():
        cmd += ["--conf", k, str(v)]
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=tempfile.mkdtemp(dir=root))
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                client.info()
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"server not up in {timeout} s:\n{log_path.read_text()[-4000:]}") from None
                time.sleep(1)
        yield {"client": client, "port": port, "url": f"http://127.0.0.1:{port}", "model_dir": model_dir,
               "log": log_path, "cache": root / "cache"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and any train/scoring subprocess it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
