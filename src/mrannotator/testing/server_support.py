"""Shared helpers for tests that run a real MONAI Label server (`monailabel start_server`) on 127.0.0.1.

One server per test module (start-up takes 15-20 s): a module-scoped fixture calls
:func:`start_server` and :func:`stop_server`; the server and any train/scoring subprocess it starts
are stopped by process group, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

APP_DIR = Path(__file__).resolve().parents[3] / "apps" / "mrannotator"  # src/mrannotator/testing -> repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    root: Path
    log_path: Path
    log: IO = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(root: Path, studies: Path, weights: Path, *, host: str | None = "127.0.0.1",
                 conf: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 ready: Any = None, timeout: float = 240, cwd: Path | None = None) -> Server:
    """Start `monailabel start_server` for the MRAnnotator app (demo weights, CPU) and wait until it answers.

    ``host=None`` leaves ``--host`` out (MONAI Label's default). ``ready(server)`` returns True once the
    server answers (default: GET /info/ without a token gives any HTTP status). ``cwd``: the server's
    working directory (default: the test's).
    """
    port = free_port()
    venv_bin = Path(sys.executable).parent
    (root / "tmp").mkdir(exist_ok=True)  # the server's temp files stay in the test's folder
    full_env = {**os.environ, "TMPDIR": str(root / "tmp"),
                "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
                "nnUNet_n_proc_DA": "0", **(env or {})}
    options = {"weights": str(weights), "device": "cpu", "model_dir": str(root / "model"), **(conf or {})}
    cmd = [str(venv_bin / "monailabel"), "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--port", str(port)]
    if host is not None:
        cmd += ["--host", host]
    for key, value in options.items():
        cmd += ["--conf", key, value]
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                            cwd=cwd)
    server = Server(proc=proc, port=port, root=root, log_path=log_path, log=log)
    ready = ready or (lambda s: requests.get(f"{s.url}/info/", timeout=5).status_code > 0)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"server exited ({proc.returncode}):\n{server.log_text()[-4000:]}")
        try:
            if ready(server):
                return server
        except (requests.RequestException, OSError):
            pass
        if time.time() > deadline:
            stop_server(server)
            raise RuntimeError(f"server not up in {timeout} s:\n{server.log_text()[-4000:]}")
        time.sleep(1)


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group (the server and its train/scoring subprocesses), then SIGKILL."""
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    except ProcessLookupError:
        pass
    server.log.close()


def client_status(call, *args, **kwargs) -> tuple[int, str]:
    """HTTP status and message of a MONAILabelClient call that is expected to fail."""
    from monailabel.client.client import MONAILabelClientException

    try:
        call(*args, **kwargs)
    except MONAILabelClientException as e:
        text = str(e.msg)
        return int(text.split(";")[0].split(":")[1]), text
    raise AssertionError(f"{getattr(call, '__name__', call)} succeeded; expected an HTTP error")


def body_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except json.JSONDecodeError:
        return response.text
