#!/usr/bin/env python3
"""Run Debian's Orthanc (+ its DICOMweb plugin) as a small PACS for MRAnnotator, on loopback.

    python scripts/orthanc.py start --dir ~/mrannotator-pacs      # prints the DICOMweb URL and credentials
    python scripts/orthanc.py stop --dir ~/mrannotator-pacs

The configuration is written here, not taken from /etc/orthanc: storage in ``--dir``, HTTP on a free
(or given) port, remote HTTP access refused, HTTP authentication on with a generated password (no
default credentials), only the DICOMweb plugin loaded. Orthanc 1.10 has no option to bind its DICOM
port to one interface: it listens on all interfaces, so we put it on a free port (or ``--dicom-port``)
and it must be firewalled (e.g. ``nft add rule inet filter input tcp dport PORT iifname != "lo" drop``)
or turned off with ``--no-dicom`` when only DICOMweb is used.

Orthanc is started as the calling user (never the system service) and stopped by its PID.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STATE_FILE = "mrannotator-orthanc.json"


@dataclass
class OrthancServer:
    pid: int
    http_port: int
    dicom_port: int | None
    username: str
    password: str
    workdir: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def auth_header(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def env(self) -> dict[str, str]:
        """What ``monailabel start_server --studies URL`` needs to reach this Orthanc."""
        return {"MONAI_LABEL_DICOMWEB_USERNAME": self.username, "MONAI_LABEL_DICOMWEB_PASSWORD": self.password}


def missing() -> str | None:
    """Why Orthanc cannot be run here, or None."""
    if shutil.which(ORTHANC) is None:
        return "Debian's orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install -y orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: Path, http_port: int, dicom_port: int | None, username: str, password: str,
                 modalities: dict | None = None) -> Path:
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "MRAnnotator-PACS",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP answers loopback clients only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port or 4242,
        "DicomAet": "MRANNOTATOR",
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,  # C-STORE only from configured modalities
        "DicomModalities": modalities or {},  # name -> [AET, host, port]: who may C-STORE
        "HttpCompressionEnabled": False,
        "StableAge": 2,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)  # holds the password
    return path


def _up(server: OrthancServer) -> bool:
    req = urllib.request.Request(f"{server.url}/system", headers=server.auth_header())
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(workdir: str | Path, http_port: int | None = None, dicom_port: int | None = None, dicom: bool = True,
          username: str = "mrannotator", timeout: float = 60, password: str | None = None,
          verbose: bool = False, modalities: dict | None = None) -> OrthancServer:
    """Start Orthanc with a config written into ``workdir``; returns when its REST API answers.
    ``password``: keep a known one (a restart on the same storage); default: a new random one.
    ``verbose``: Orthanc logs every HTTP request (what reached the PACS, for tests).
    ``modalities``: DICOM nodes allowed to C-STORE here (AE title -> [AET, host, port])."""
    why = missing()
    if why:
        raise RuntimeError(why)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = (dicom_port or free_port()) if dicom else None
    password = password or secrets.token_urlsafe(18)
    config = write_config(workdir, http_port, dicom_port, username, password, modalities)
    log = open(workdir / "orthanc.log", "ab")
    command = [ORTHANC, *(["--verbose"] if verbose else []), str(config)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                            start_new_session=True)
    log.close()
    server = OrthancServer(proc.pid, http_port, dicom_port, username, password, str(workdir))
    deadline = time.time() + timeout
    while not _up(server):
        if proc.poll() is not None or time.time() > deadline:
            stop(server)
            tail = (workdir / "orthanc.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Orthanc did not come up on 127.0.0.1:{http_port}:\n{tail}")
        time.sleep(0.2)
    state = workdir / STATE_FILE
    state.write_text(json.dumps(asdict(server)))
    state.chmod(0o600)
    return server


def stop(server: OrthancServer, timeout: float = 20) -> None:
    """Stop the Orthanc we started (by PID), waiting for it to exit."""
    try:
        os.kill(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid, _ = os.waitpid(server.pid, os.WNOHANG)
            if pid:
                return
        except ChildProcessError:  # not our child (started by another `start` call): poll instead
            try:
                os.kill(server.pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    os.kill(server.pid, signal.SIGKILL)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", required=True, help="storage and config folder")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--dicom-port", type=int, default=None, help="DICOM port (all interfaces: firewall it)")
    p.add_argument("--no-dicom", action="store_true", help="DICOMweb only: no DICOM listener at all")
    a = p.parse_args(argv)
    state = Path(a.dir).expanduser() / STATE_FILE
    if a.action == "stop":
        if not state.is_file():
            print(f"no Orthanc started in {a.dir}", file=sys.stderr)
            return 1
        stop(OrthancServer(**json.loads(state.read_text())))
        state.unlink()
        print("stopped")
        return 0
    server = start(a.dir, a.http_port, a.dicom_port, dicom=not a.no_dicom)
    print(f"Orthanc PID {server.pid}; DICOMweb {server.dicomweb_url}")
    if server.dicom_port:
        print(f"DICOM port {server.dicom_port} listens on ALL interfaces (Orthanc 1.10): firewall it")
    print(f"export MONAI_LABEL_DICOMWEB_USERNAME={server.username}")
    print(f"export MONAI_LABEL_DICOMWEB_PASSWORD={server.password}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
