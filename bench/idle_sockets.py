"""/info latency while 2,000 idle or half-sent sockets are held open against the server (issue 20).

Starts `monailabel start_server --app apps/mrannotator` on 127.0.0.1 (demo weights, CPU, no auth), then:

1. idle timeout: opens ``--probe`` sockets that send nothing and times how long the server keeps each;
2. holds ``--sockets`` sockets open (half send nothing, half send a request head one header line per
   second, as slowloris does), re-opening those the server closes at most ``--reopen-rate`` per second,
   while GET /info/ is timed every ``--interval`` s on a new connection; the server's open file
   descriptors are sampled meanwhile.

    .venv/bin/python bench/idle_sockets.py                          # the server's defaults
    .venv/bin/python bench/idle_sockets.py --idle-timeout 120 --max-connections 4000  # all 2,000 held

Prints one JSON report (latency percentiles, closes seen by the client, the server's fd count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def idle_close_times(port: int, n: int, limit: float) -> list[float]:
    """Seconds until the server closes each of ``n`` sockets that never send a byte."""
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed: list[float] = []
    while len(closed) < n and time.monotonic() - t0 < limit:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                closed.append(time.monotonic() - t0)
                sel.unregister(key.fileobj)
                key.fileobj.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return closed


class Holder(threading.Thread):
    """Keeps ``n`` sockets open (half idle, half slowloris), re-opening closed ones at a bounded rate."""

    def __init__(self, port: int, n: int, reopen_rate: float):
        super().__init__(daemon=True)
        self.port, self.n, self.reopen_rate = port, n, reopen_rate
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.closed = {"idle": 0, "slowloris": 0}
        self.answers: dict[str, int] = {}
        self.failed_connects = 0
        self.reopened = 0

    def _open(self, kind: str) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.failed_connects += 1
            return
        if kind == "slowloris":
            s.sendall(b"GET /info/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, kind)

    def open_all(self) -> None:
        for i in range(self.n):
            self._open("idle" if i % 2 else "slowloris")

    def run(self) -> None:
        missing: list[str] = []
        last_drip = last_reopen = time.monotonic()
        allowance = 0.0  # token bucket: at most reopen_rate re-opened sockets per second
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 "):
                    code = data[9:12].decode()
                    self.answers[code] = self.answers.get(code, 0) + 1
                if not data:
                    self.closed[key.data] += 1
                    missing.append(key.data)
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
            now = time.monotonic()
            allowance = min(self.reopen_rate, allowance + (now - last_reopen) * self.reopen_rate)
            last_reopen = now
            while missing and allowance >= 1:
                self._open(missing.pop())
                self.reopened += 1
                allowance -= 1
            if time.monotonic() - last_drip >= 1.0:  # one more header line on every slowloris socket
                last_drip = time.monotonic()
                for key in list(self.sel.get_map().values()):
                    if key.data == "slowloris":
                        try:
                            key.fileobj.send(b"X-Slow: 1\r\n")
                        except OSError:
                            pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()

    def open_count(self) -> int:
        return len(self.sel.get_map())


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def measure(url: str, pid: int, holder: Holder, requests_n: int, interval: float) -> dict:
    latencies, errors, fds, held = [], [], [], []
    for _ in range(requests_n):
        t0 = time.monotonic()
        try:
            r = requests.get(f"{url}/info/", timeout=10)
            if r.status_code != 200:
                errors.append(r.status_code)
        except requests.RequestException as e:
            errors.append(type(e).__name__)
        latencies.append(time.monotonic() - t0)
        fds.append(_fd_count(pid))
        held.append(holder.open_count())
        time.sleep(interval)
    return {"requests": len(latencies), "errors": errors,
            "info_s": {"p50": round(statistics.median(latencies), 3), "p95": round(_percentile(latencies, 0.95), 3),
                       "max": round(max(latencies), 3)},
            "server_fds": {"min": min(fds), "max": max(fds)},
            "client_sockets_open": {"min": min(held), "max": max(held)}}


def main(argv=None) -> int:
    from mrannotator.testing.server_support import start_server, stop_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sockets", type=int, default=2000)
    ap.add_argument("--probe", type=int, default=200, help="sockets timed for the idle timeout")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--reopen-rate", type=float, default=200.0, help="re-opened sockets per second, at most")
    ap.add_argument("--idle-timeout", type=float, help="MRANNOTATOR_HTTP_IDLE_TIMEOUT_S (default: the server's)")
    ap.add_argument("--max-connections", type=int, help="MRANNOTATOR_HTTP_MAX_CONNECTIONS")
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "demo")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = {}
    if args.idle_timeout:
        env["MRANNOTATOR_HTTP_IDLE_TIMEOUT_S"] = str(args.idle_timeout)
    if args.max_connections:
        env["MRANNOTATOR_HTTP_MAX_CONNECTIONS"] = str(args.max_connections)

    with tempfile.TemporaryDirectory(prefix="mra-idle-") as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        server = start_server(root, studies, args.weights, conf={"device": "cpu"}, env=env)
        try:
            baseline = measure(server.url, server.proc.pid, Holder(server.port, 0, 0), 20, args.interval)
            closes = idle_close_times(server.port, args.probe, limit=(args.idle_timeout or 5) * 3 + 10)
            holder = Holder(server.port, args.sockets, args.reopen_rate)
            t0 = time.monotonic()
            holder.open_all()
            opened_s = time.monotonic() - t0
            holder.start()
            loaded = measure(server.url, server.proc.pid, holder, args.requests, args.interval)
            holder.stop.set()
            holder.join(10)
        finally:
            stop_server(server)
    report = {"settings": {k: v for k, v in vars(args).items() if k != "weights"} | {"env": env},
              "baseline": baseline,
              "idle_timeout_probe": {"sockets": args.probe, "closed": len(closes),
                                     "closed_after_s": {"min": round(min(closes), 2), "median":
                                                        round(statistics.median(closes), 2),
                                                        "max": round(max(closes), 2)} if closes else None},
              "held": {"opened_in_s": round(opened_s, 2), "failed_connects": holder.failed_connects,
                       "reopened": holder.reopened,
                       "closed_by_server": holder.closed, "answers_seen": holder.answers, **loaded}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
