"""A real Orthanc (Debian's, + DICOMweb plugin) and a real MONAI Label server on it, for tests and benches.

Both bind 127.0.0.1, live in a temp folder and are stopped by PID. Orthanc is started by
``scripts/orthanc.py`` (the same script users run), so the tests exercise the documented set-up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[3]  # src/mrannotator/testing -> the repository
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
    """``monailabel start_server --app apps/mrannotator --studies STUDIES`` on a free loopback port
    (server_support's start/stop, with the DICOMweb cache in ``root``); yields a client and the paths."""
    from monailabel.client import MONAILabelClient

    from .server_support import start_server, stop_server

    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"), **(env or {})}
    server = start_server(root, studies, weights, conf={k: str(v) for k, v in (conf or {}).items()}, env=env,
                          timeout=timeout)
    try:
        client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp(dir=root))
        yield {"client": client, "port": server.port, "url": server.url, "model_dir": root / "model",
               "log": server.log_path, "cache": root / "cache"}
    finally:
        stop_server(server)


class RestartableOrthanc:
    """An Orthanc that a test stops and starts again on the same port and storage (a PACS outage), with
    ``--verbose`` so that every HTTP request it received is in its log (:meth:`requests_since`)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.server = orthanc.start(self.workdir, dicom=False, verbose=True)

    def __getattr__(self, name):  # url, dicomweb_url, username, password, env(), auth_header(), pid
        return getattr(self._last, name)  # also while stopped: where it was and will be again

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def running(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        if self.server is not None:
            orthanc.stop(self.server)
            self.server = None

    def start(self, password: str | None = None) -> None:
        """Start again on the same port and storage; with the same password unless another is given."""
        last = self._last
        self.stop()
        self.server = orthanc.start(self.workdir, http_port=last.http_port, dicom=False, verbose=True,
                                    username=last.username, password=password or last.password)

    def __setattr__(self, name, value):
        if name == "server" and value is not None:
            object.__setattr__(self, "_last", value)
        object.__setattr__(self, name, value)

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def requests_since(self, offset: int) -> list[str]:
        """``METHOD /path`` of every HTTP request Orthanc logged after ``offset`` (bytes of its log)."""
        import re

        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return re.findall(r"\(http\) ([A-Z]+ \S+)", text)
