"""The batch's pool of workers, started when the first case to do is planned (or earlier, on a new batch)."""

from __future__ import annotations

from .cluster import default_workers, start_workers
from .feed import PlanFeed
from .inputs import Case
from .progress import Progress


class Pool:
    """The workers: started with the first case to do, or as soon as Ray is up when OUT holds no record yet (a new
    batch on a large tree: models load while the tree is read)."""

    def __init__(self, ray_session, worker_args: dict, workers, threads_per_worker, gpus_per_worker,
                 worker_resources, early: bool):
        self.ray_session, self.worker_args, self.early = ray_session, worker_args, early
        self.shape = (threads_per_worker, gpus_per_worker, worker_resources)
        self.workers, self.n = workers, 0
        self.actors: list | None = None

    def start(self, cap: int | None = None) -> list:
        if self.actors is None:
            threads, gpus, resources = self.shape
            self.ray_session.get()
            self.n = self.workers or default_workers(threads, gpus)  # the cluster's CPUs / GPUs: Ray is up
            self.n = min(self.n, cap) if cap else self.n
            self.actors = start_workers(self.ray_session.get(), self.n, self.worker_args, threads, gpus, resources)
        return self.actors

    def close(self) -> None:
        if self.actors is not None:
            self.ray_session.get().end_workers()


def first_cases(feed: PlanFeed, pool: Pool, progress: Progress) -> list[Case]:
    """Wait for the first cases to process (or the end of planning), starting Ray when planning asks for it."""
    while True:
        pool.ray_session.serve()
        if pool.early and pool.ray_session.session is not None:
            pool.start()
        todo = feed.poll(timeout=0.1)
        progress.add(**feed.take_counts())
        if todo or feed.finished.is_set():
            return todo + feed.poll()
