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

import logging
import os
from dataclasses import dataclass, field

from ..errors import MRAnnotatorError
from .inputs import serial_map
from .worker import SegmentWorker

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
# cases a worker holds at once: on a GPU worker one is read or written while the other is in inference; on a CPU
# worker that overlap slowed the network pass more than it saved (bench/README.md: 5.33 vs 4.93 s per case)
CASES_IN_FLIGHT_GPU, CASES_IN_FLIGHT_CPU = 2, 1
SCAN_UNITS_PER_TASK = 8  # DICOM study folders scanned by one Ray task when a batch is planned


def cases_in_flight(gpus_per_worker: float) -> int:
    return CASES_IN_FLIGHT_GPU if gpus_per_worker > 0 else CASES_IN_FLIGHT_CPU


@dataclass
class RaySession:
    """How this batch holds Ray: whether it must shut Ray down, and the workers it must end."""

    started_here: bool
    connected_here: bool
    actors: list = field(default_factory=list)

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


def connect(address: str | None = None) -> RaySession:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one on loopback."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # Ray publishes its local services on the machine's outward address unless it thinks it runs a
        # single-machine (laptop) cluster; read when ray is first imported, inherited by its processes
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return RaySession(started_here=False, connected_here=False)
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **quiet)
            return RaySession(started_here=False, connected_here=True)
        # address="local": a new Ray of our own, never one that `ray start` (another user, a test) runs here
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 num_cpus=os.cpu_count(), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise MRAnnotatorError(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: {e}"
                               ) from e
    return RaySession(started_here=True, connected_here=False)


def ray_map(func, items: list[tuple], per_task: int = SCAN_UNITS_PER_TASK) -> list:
    """``[func(*args) for args in items]``, computed by Ray tasks of ``per_task`` items each, anywhere in the
    cluster (1 CPU each); serial in this process when there are too few items to be worth a task."""
    items = list(items)
    if len(items) <= per_task:
        return serial_map(func, items)
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(serial_map)
    refs = [task.remote(func, items[i:i + per_task]) for i in range(0, len(items), per_task)]
    return [r for chunk in ray.get(refs) for r in chunk]


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
