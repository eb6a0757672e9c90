"""The batch driver: plan the cases, skip those the ledger has, feed the rest to the Ray workers, write the tables.

Ray decides where workers run and restarts a worker whose process dies; the driver only keeps each worker
fed with two cases (bounded, so memory stays flat over thousands of cases), retries the cases a dead worker
was holding (``retry`` times), and shows progress. Each worker writes a case's outputs and its ledger record
itself, so a killed driver loses at most the cases then in flight.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..errors import MRAnnotatorError
from ..weights import load_weights
from .cluster import SCAN_UNITS_PER_TASK, cases_in_flight, connect, default_workers, ray_map, start_workers
from .inputs import Case, plan_inputs
from .ledger import Ledger, finished_cases, remove_stale_temporaries, same_key, weights_version
from .tables import write_tables

WORKER_START_TIMEOUT_S = 900.0  # models load in seconds; a worker Ray cannot place (no free GPU) never starts


@dataclass
class BatchSummary:
    """What a batch did. ``processed`` counts the cases this run segmented (or tried to)."""

    out_dir: Path
    total: int
    already_done: int
    processed: int
    failed: int
    retried: int
    workers: int
    seconds: float
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> cases this run processed there
    tables: dict[str, Path] = field(default_factory=dict)


def run_batch(source: str | Path, out_dir: str | Path, *, address: str | None = None, workers: int | None = None,
              gpus_per_worker: float = 0.0, threads_per_worker: int = 1, regions: Sequence[str] | str | None = None,
              fast: bool = False, retry: int = 2, quiet: bool = False, preview: bool = False,
              weights: str | Path | None = None, worker_resources: dict | None = None,
              on_record: Callable[[dict], None] | None = None) -> BatchSummary:
    """Segment every case of ``source`` (NIfTI files, DICOM tree or CSV manifest) into ``out_dir`` on Ray.

    Re-running the same call after a crash or Ctrl-C finishes the remaining cases only. ``on_record`` is called
    in the driver with each case's ledger record as it arrives.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ray_session = _LazySession(address)
    try:
        return _run(source, out, ray_session, t0, workers=workers, gpus_per_worker=gpus_per_worker,
                    threads_per_worker=threads_per_worker, regions=regions, fast=fast, retry=retry, quiet=quiet,
                    preview=preview, weights=weights, worker_resources=worker_resources, on_record=on_record)
    finally:
        ray_session.close()


class _LazySession:
    """Ray, joined or started on first use: a small input is planned without it, a finished one never starts it."""

    def __init__(self, address: str | None):
        self.address, self.session = address, None

    def get(self):
        if self.session is None:
            self.session = connect(self.address)
        return self.session

    def scan_map(self, func, items: list[tuple]) -> list:
        """Planning's map: a DICOM tree of more study folders than one task takes is scanned by Ray tasks
        (``ray_map`` scans fewer in this process, so Ray is started only for more)."""
        if len(items) > SCAN_UNITS_PER_TASK:
            self.get()
        return ray_map(func, items)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def _run(source, out: Path, ray_session: _LazySession, t0: float, *, workers, gpus_per_worker, threads_per_worker,
         regions, fast, retry, quiet, preview, weights, worker_resources, on_record) -> BatchSummary:
    resolved = load_weights(weights)  # a weights problem stops here, before any worker starts
    plan = plan_inputs(source, regions, map_fn=ray_session.scan_map)
    mode = "fast" if fast else "exact"
    version = weights_version(resolved)
    run = {"run": f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
           "weights": f"{resolved.source}:{version}", "weights_version": version, "mode": mode}

    def key_of(case: Case) -> dict:  # what makes a finished case still valid (besides its input's checksum)
        return {"weights_version": version, "mode": mode, "regions": case.route.label}

    ledger = Ledger(out)
    done_before = finished_cases(plan.cases, ledger.read(), key_of)
    todo = [c for c in plan.cases if c.name not in done_before]
    remove_stale_temporaries(out)
    stats = Counter()
    n_workers = 0
    if todo:
        worker_args = {"out_dir": str(out.resolve()), "run": run, "weights": str(resolved.root),
                       "device": "cuda" if gpus_per_worker > 0 else "cpu", "threads": threads_per_worker,
                       "mode": mode, "regions": None if regions in (None, "auto") else list(regions),
                       "preview": preview}
        n_workers, stats = _process(todo, len(plan.cases), len(done_before), ledger, run, worker_args,
                                    session=ray_session.get(), workers=workers, threads_per_worker=threads_per_worker,
                                    gpus_per_worker=gpus_per_worker, worker_resources=worker_resources,
                                    retry=retry, quiet=quiet, on_record=on_record)
    records = ledger.read()
    current = [rec for c in plan.cases if (rec := records.get(c.name)) and same_key(rec, key_of(c))]
    tables = write_tables(out, current, plan.skipped)
    failed = sum(r.get("status") != "done" for r in current) + len(plan.skipped)
    return BatchSummary(out, len(plan.cases), len(done_before), stats["processed"], failed, stats["retried"],
                        n_workers, time.perf_counter() - t0,
                        {k[5:]: v for k, v in stats.items() if k.startswith("node:")}, tables)


def _process(todo: list[Case], total: int, already: int, ledger: Ledger, run: dict, worker_args: dict, *,
             session, workers, threads_per_worker, gpus_per_worker, worker_resources, retry, quiet, on_record):
    """Run ``todo`` on Ray workers; returns (number of workers, counters)."""
    try:
        n = workers or min(default_workers(threads_per_worker, gpus_per_worker), len(todo))
        actors = start_workers(session, n, worker_args, threads_per_worker, gpus_per_worker, worker_resources)
        progress = _Progress(total, already, quiet)
        try:
            dispatch = _Dispatcher(actors, todo, retry, ledger, run, progress, on_record,
                                   in_flight=cases_in_flight(gpus_per_worker))
            dispatch.run()
        except KeyboardInterrupt:
            progress.close()
            print(f"mrannotator batch: interrupted; {ledger.folder} keeps every finished case: run the same "
                  "command again to finish the rest", file=sys.stderr)
            raise
        progress.close()
        return n, dispatch.stats
    finally:
        session.end_workers()


class _Dispatcher:
    """Keeps every live worker fed with ``in_flight`` cases (``cluster.cases_in_flight``) until all cases have a
    record.

    A worker whose process died is left alone while Ray restarts it (calls to a restarting actor fail at once)
    and probed with ``ready()`` every ``PROBE_INTERVAL_S`` until its models are loaded again.
    """

    PROBE_INTERVAL_S = 1.0

    def __init__(self, actors: list, cases: list[Case], retry: int, ledger: Ledger, run: dict, progress,
                 on_record, in_flight: int):
        import ray

        self.actors = actors
        self.pending = deque((c, 1) for c in cases)
        self.inflight: dict = {}  # object ref -> (case, attempt, worker index)
        self.probing = {a.ready.remote(): i for i, a in enumerate(actors)}  # ready() ref -> worker index
        self.probe_later: dict[int, float] = {}  # worker index -> when to probe it again
        self.down: set[int] = set(range(len(actors)))  # workers not (yet, or no longer) taking cases
        self.dead: dict[int, str] = {}  # workers Ray could not (re)start, with the reason
        self.ever_ready = False
        self.retry, self.ledger, self.run_key, self.progress, self.on_record = retry, ledger, run, progress, on_record
        self.in_flight = in_flight
        self.stats: Counter = Counter()
        self._ray = ray

    def run(self) -> None:
        started = time.monotonic()
        while self.pending or self.inflight:
            self._probe_due()
            if len(self.dead) == len(self.actors):
                raise MRAnnotatorError("no batch worker could start:\n  " + "\n  ".join(
                    f"worker {i}: {why}" for i, why in sorted(self.dead.items())))
            refs = [*self.inflight, *self.probing]
            if refs:
                ready, _ = self._ray.wait(refs, num_returns=1, timeout=0.5)
            else:  # every worker is restarting: wait for the next probe
                ready = []
                time.sleep(0.2)
            self.progress.refresh()
            if not ready:
                if not self.ever_ready and time.monotonic() - started > WORKER_START_TIMEOUT_S:
                    raise MRAnnotatorError(f"no batch worker started within {WORKER_START_TIMEOUT_S:.0f} s: does "
                                           "the cluster have the CPUs / GPUs asked for each worker?")
                continue
            if ready[0] in self.probing:
                self._probed(ready[0])
            else:
                self._case_returned(ready[0])

    def _probe_due(self) -> None:
        now = time.monotonic()
        for i, when in list(self.probe_later.items()):
            if when <= now:
                del self.probe_later[i]
                self.probing[self.actors[i].ready.remote()] = i

    def _probed(self, ref) -> None:
        i = self.probing.pop(ref)
        try:
            self._ray.get(ref)
        except self._ray.exceptions.ActorUnavailableError:  # still restarting
            self.probe_later[i] = time.monotonic() + self.PROBE_INTERVAL_S
            return
        except self._ray.exceptions.RayError as e:  # e.g. the models could not load on that node
            self.dead[i] = _short(e)
            return
        self.ever_ready = True
        self.down.discard(i)
        self._feed(i)

    def _feed(self, i: int) -> None:
        if i in self.down:
            return
        busy = sum(1 for _, _, w in self.inflight.values() if w == i)
        while self.pending and busy < self.in_flight:
            case, attempt = self.pending.popleft()
            self.inflight[self.actors[i].process.remote(case, attempt)] = (case, attempt, i)
            busy += 1

    def _case_returned(self, ref) -> None:
        case, attempt, i = self.inflight.pop(ref)
        try:
            record = self._ray.get(ref)
        except self._ray.exceptions.RayError as e:  # the worker process died (killed, out of memory, ...)
            if i not in self.down:  # Ray restarts it; probe until its models are loaded again
                self.down.add(i)
                self.probe_later[i] = time.monotonic() + self.PROBE_INTERVAL_S
            if attempt <= self.retry:
                self.stats["retried"] += 1
                self.pending.appendleft((case, attempt + 1))
                for j in range(len(self.actors)):  # another live worker may take it now
                    self._feed(j)
                return
            record = self._worker_failure(case, attempt, e)
        self.stats["processed"] += 1
        self.stats[f"node:{record.get('node', '')}"] += 1
        self.progress.update(record)
        if self.on_record is not None:
            self.on_record(record)
        self._feed(i)

    def _worker_failure(self, case: Case, attempt: int, error: Exception) -> dict:
        record = {"case": case.name, "path": case.path, "kind": case.kind, "regions": case.route.label,
                  "routed_by": case.route.reason, **self.run_key, "attempt": attempt, "status": "failed",
                  "failure": "worker", "header": case.header, "seconds": 0.0,
                  "error": f"the worker process died on each of {attempt} attempts: {_short(error)}",
                  "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        self.ledger.write(record)
        return record


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class _Progress:
    """cases done / total, cases per minute, ETA and failures on one line of stderr (nothing when quiet)."""

    def __init__(self, total: int, already: int, quiet: bool):
        from tqdm import tqdm

        self.failed = 0
        self.t0 = time.monotonic()
        self.done_here = 0
        self.live = sys.stderr.isatty()  # a log file gets one line per case, not a redraw every half second
        self.bar = tqdm(total=total, initial=already, disable=quiet, file=sys.stderr, unit="case", smoothing=0.1,
                        mininterval=0.5 if self.live else 0.0,
                        bar_format="{n}/{total} cases |{bar:20}| {elapsed} elapsed, ETA {remaining}{postfix}")

    def update(self, record: dict) -> None:
        self.done_here += 1
        self.failed += record.get("status") != "done"
        per_min = 60.0 * self.done_here / max(time.monotonic() - self.t0, 1e-6)
        self.bar.set_postfix_str(f"{per_min:.1f} cases/min, {self.failed} failed", refresh=False)
        self.bar.update(1)

    def refresh(self) -> None:
        if self.live:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
