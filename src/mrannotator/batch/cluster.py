"""Ray for a batch: an embedded local cluster, or an existing one, and the pool of segmentation workers.

- No address (and no ``RAY_ADDRESS``): a local Ray is started in this process, on loopback only, without the
  dashboard, with a small object store (only case descriptions and ledger records travel through it: the
  workers read inputs and write outputs themselves), and shut down at the end.
- ``--address auto`` / ``ray://HOST:PORT`` / ``RAY_ADDRESS``: the batch joins that cluster (``ray start --head``
  on one node and ``ray start --address`` on the others, or KubeRay) and leaves it running. Every node needs
  this package installed, and INPUT and OUT must be paths that every node sees (a shared filesystem).
- A Ray already initialised by the caller (a notebook, a test's ``ray.cluster_utils.Cluster``) is used as is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MRAnnotatorError
from .inputs import serial_map
from .worker import SegmentWorker

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
# cases a worker holds at once: on a GPU worker one is read or written while the other is in inference; on a CPU
# worker that overlap slowed the network pass more than it saved (bench/README.md: 5.33 vs 4.93 s per case)
CASES_IN_FLIGHT_GPU, CASES_IN_FLIGHT_CPU = 2, 1
LOG_DIR = "logs"  # OUT/logs/ray.log: Ray's own notices, kept off the progress line


def cases_in_flight(gpus_per_worker: float) -> int:
    return CASES_IN_FLIGHT_GPU if gpus_per_worker > 0 else CASES_IN_FLIGHT_CPU


@dataclass
class RaySession:
    """How this batch holds Ray: whether it must shut Ray down, and the workers it must end."""

    started_here: bool
    connected_here: bool
    actors: list = field(default_factory=list)
    env_set: list = field(default_factory=list)  # environment variables set for a local Ray, removed at close

    def end_workers(self) -> None:
        import ray

        for a in self.actors:  # on a shared cluster our actors must not outlive the batch
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: S110 - already dead is fine
                pass
        self.actors.clear()

    def close(self) -> None:
        import ray

        self.end_workers()
        if self.started_here or self.connected_here:
            ray.shutdown()
        for name in self.env_set:
            os.environ.pop(name, None)
        if self.env_set:
            _reload_auth_config()


class ClusterError(MRAnnotatorError):
    """The Ray cluster cannot be joined (unreachable, auth token, version mismatch) or its nodes cannot see INPUT /
    OUT; the message names which."""

    exit_code = 4


def connect(address: str | None = None, log_dir: Path | None = None) -> RaySession:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one on loopback. Ray's own log lines
    (start-up, auth notices) go to ``log_dir/ray.log``, not to the terminal's progress line."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # Ray publishes its local services on the machine's outward address unless it thinks it runs a
        # single-machine (laptop) cluster; read when ray is first imported, inherited by its processes
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return RaySession(started_here=False, connected_here=False)
    if address:
        _check_reachable(address)
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    log = _ray_log(log_dir)
    env_set: list[str] = []
    try:
        with _stderr_to(log):
            if address:
                ray.init(address=address, **quiet)
                return RaySession(started_here=False, connected_here=True)
            # a new Ray of our own, never one that `ray start` (another user, a test) runs here; token auth with a
            # token of this run only (Ray would otherwise write one to ~/.ray and warn about it)
            env_set = _local_token()
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     num_cpus=os.cpu_count(), **quiet)
    except Exception as e:
        raise _why(address, e, log) from e
    return RaySession(started_here=True, connected_here=False, env_set=env_set)


@contextlib.contextmanager
def _stderr_to(log):
    """Python's and Ray's C++ lines written to stderr while Ray starts go to ``log`` (Ray's Python log handler keeps
    the stream it was created with; the C++ core writes to file descriptor 2 directly)."""
    fd = log.fileno() if hasattr(log, "fileno") and not isinstance(log, io.StringIO) else None
    saved = os.dup(2) if fd is not None else None
    try:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(fd, 2)
        with contextlib.redirect_stderr(log):
            yield
    finally:
        log.flush()
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def _ray_log(log_dir: Path | None):
    if log_dir is None:
        return io.StringIO()
    log_dir.mkdir(parents=True, exist_ok=True)
    return open(log_dir / "ray.log", "a", buffering=1)  # noqa: SIM115 - Ray's handler writes to it after init


def _local_token() -> list[str]:
    if os.environ.get("RAY_AUTH_MODE") is not None or os.environ.get("RAY_AUTH_TOKEN"):
        return []
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _reload_auth_config()
    return ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN"]


def _reload_auth_config() -> None:
    """Ray caches its auth settings when first imported: read them again (as Ray's own token set-up does)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _check_reachable(address: str) -> None:
    """A HOST:PORT or ray://HOST:PORT address that nothing answers on fails here in seconds (Ray itself retries
    for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address}: not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ClusterError(f"cannot join the Ray cluster at {address}: unreachable ({e.strerror or e}): is "
                           "`ray start --head` running there, and is the port open?") from e


def _why(address: str | None, error: Exception, log) -> ClusterError:
    """A ClusterError naming the cause: auth token, version mismatch, unreachable, or Ray's own words (Ray's own
    log lines of the attempt, in ``log``, tell an auth refusal from an unreachable cluster)."""
    text = str(error)
    try:
        logged = log.getvalue() if isinstance(log, io.StringIO) else Path(log.name).read_text(errors="replace")
    except OSError:
        logged = ""
    if "InvalidAuthToken" in logged[-20000:] or "Unauthenticated" in logged[-20000:]:
        text += " (InvalidAuthToken)"
    where = f"join the Ray cluster at {address}" if address else "start a local Ray"
    if "auth" in text.lower() or "token" in text.lower() or type(error).__name__ == "AuthenticationError":
        cause = ("authentication token: the cluster uses token auth (RAY_AUTH_MODE=token) and this process has no "
                 "token or another one: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                 "cluster's token")
    elif "Version mismatch" in text:
        cause = "version mismatch: every node and the driver need the same Ray and Python versions"
    elif any(w in text for w in ("Could not find any running Ray", "Failed to connect", "imed out")):
        cause = "unreachable: no Ray answers at that address (`ray start --head` there, the port open?)"
    else:
        cause = "Ray said"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    return ClusterError(f"cannot {where}: {cause}. ({type(error).__name__}: {first})")


def ray_map(func, items: list[tuple], per_task: int = 8) -> list:
    """``[func(*args) for args in items]``, computed by Ray tasks of ``per_task`` items each, anywhere in the
    cluster (1 CPU each); serial in this process when there are too few items to be worth a task."""
    items = list(items)
    if len(items) <= per_task:
        return serial_map(func, items)
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(serial_map)
    refs = [task.remote(func, items[i:i + per_task]) for i in range(0, len(items), per_task)]
    return [r for chunk in ray.get(refs) for r in chunk]


def ray_imap(func, items: list[tuple], window: int | None = None):
    """``func(*args)`` for each item, yielded in order as each is ready, one Ray task per item, at most ``window``
    in flight (default: half the cluster's CPUs, so that the workers' model loading is not starved). The tasks ask
    for no CPU, so that they run next to batch workers that hold every CPU (on 2 cores: 1 worker segments while
    planning goes on), and are spread over the nodes. One item is computed in this process."""
    items = list(items)
    if len(items) <= 1:
        yield from serial_map(func, items)
        return
    from collections import deque

    import ray

    window = window or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)  # the other half: workers start
    task = ray.remote(num_cpus=0, max_retries=2, scheduling_strategy="SPREAD")(func)
    refs: deque = deque()
    for args in items:
        refs.append(task.remote(*args))
        if len(refs) >= window:
            yield ray.get(refs.popleft())
    while refs:
        yield ray.get(refs.popleft())


def default_workers(threads_per_worker: int, gpus_per_worker: float) -> int:
    """As many workers as the cluster's GPUs (GPU workers) or CPUs (CPU workers) allow, at least one."""
    import ray

    res = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) // gpus_per_worker))
    return max(1, int(res.get("CPU", 1) // max(1, threads_per_worker)))


def start_workers(session: RaySession, n: int, worker_args: dict, threads_per_worker: int,
                  gpus_per_worker: float, resources: dict | None = None) -> list:
    """``n`` SegmentWorker actors, spread over the nodes; Ray restarts one whose process dies."""
    import ray

    remote = ray.remote(SegmentWorker).options(
        num_cpus=threads_per_worker,
        num_gpus=gpus_per_worker,
        resources=resources or {},
        max_restarts=-1,  # a dead worker process is replaced (models load again) ...
        max_task_retries=0,  # ... but the driver retries its cases itself, counting attempts (--retry)
        max_concurrency=cases_in_flight(gpus_per_worker),
        scheduling_strategy="SPREAD",
    )
    session.actors = [remote.remote(**worker_args) for _ in range(n)]
    return session.actors
