"""The batch driver: plan the cases, skip those the ledger has, feed the rest to the Ray workers, write the tables.

Ray decides where workers run and restarts a worker whose process dies; the driver only keeps each worker
fed with two cases (bounded, so memory stays flat over thousands of cases), retries the cases a dead worker
was holding (``retry`` times), and shows progress. Each worker writes a case's outputs and its ledger record
itself, so a killed driver loses at most the cases then in flight.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InputError, MRAnnotatorError
from ..weights import load_weights
from .cluster import LOG_DIR, ClusterError, cases_in_flight, connect, ray_imap
from .feed import PlanFeed, refuse_split
from .inputs import Case, Plan, plan_inputs, serial_map
from .ledger import Ledger, remove_stale_temporaries, same_key, weights_version
from .naming import Pseudonyms
from .pool import Pool, first_cases
from .progress import Progress
from .tables import write_plan, write_tables

WORKER_START_TIMEOUT_S = 900.0  # models load in seconds; a worker Ray cannot place (no free GPU) never starts


@dataclass
class BatchSummary:
    """What a batch did. ``processed`` counts the cases this run segmented (or tried to); ``failed`` the cases
    refused or failed (the ``refused`` and ``failed`` rows of cases.csv), the same count the progress line shows."""

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
    empty: int = 0  # cases segmented with nothing found
    sidecars: int = 0  # non-image files ignored
    notes: list[str] = field(default_factory=list)  # renamed manifest ids, OUT left out of INPUT
    dry_run: bool = False


def run_batch(source: str | Path, out_dir: str | Path, *, address: str | None = None, workers: int | None = None,
              gpus_per_worker: float = 0.0, threads_per_worker: int = 1, regions: Sequence[str] | str | None = None,
              fast: bool = False, retry: int = 2, quiet: bool = False, preview: bool = False,
              weights: str | Path | None = None, worker_resources: dict | None = None,
              on_record: Callable[[dict], None] | None = None, private: bool = True,
              dry_run: bool = False, stack: str | None = None) -> BatchSummary:
    """Segment every case of ``source`` (NIfTI files, DICOM tree or CSV manifest) into ``out_dir`` on Ray.

    Re-running the same call after a crash or Ctrl-C finishes the remaining cases only. ``on_record`` is called
    in the driver with each case's ledger record as it arrives. ``private``: DICOM cases named by pseudonyms
    (key in OUT/private). ``dry_run``: plan only, write ``OUT/plan.csv`` and return. ``stack``: the 3D stack of
    DICOM series that hold several (``echo=2``, ``b=1000``...; default the first). Cases are dispatched as soon as
    their folder is planned, while planning goes on.
    """
    t0 = time.perf_counter()
    out = Path(os.path.abspath(out_dir))
    source = Path(os.path.abspath(source))  # resolved once: workers on other nodes get absolute paths
    out.mkdir(parents=True, exist_ok=True)
    # a dry run on this machine reads the headers here: starting a local Ray would cost more than its tasks save
    ray_session = _LazySession(address, out, in_driver=dry_run and not (address or os.environ.get("RAY_ADDRESS")))
    try:
        return _run(source, out, ray_session, t0, workers=workers, gpus_per_worker=gpus_per_worker,
                    threads_per_worker=threads_per_worker, regions=regions, fast=fast, retry=retry, quiet=quiet,
                    preview=preview, weights=weights, worker_resources=worker_resources, on_record=on_record,
                    private=private, dry_run=dry_run, stack=stack)
    finally:
        ray_session.close()


class _LazySession:
    """Ray, joined or started on first use: a small input is planned without it, a finished one never starts it.
    Ray is started in the main thread: the planning thread asks for it and waits (:meth:`serve`)."""

    def __init__(self, address: str | None, out: Path, in_driver: bool = False):
        self.address, self.out, self.session, self.in_driver = address, out, None, in_driver
        self.wanted, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def get(self):
        if threading.current_thread() is not threading.main_thread():
            self.wanted.set()
            self.ready.wait()  # set once the main thread has connected (or failed to)
            if self.error is not None:
                raise self.error
            return self.session
        if self.session is None:
            try:
                self.session = connect(self.address, log_dir=self.out / LOG_DIR)
            except BaseException as e:
                self.error = e
                raise
            finally:
                self.ready.set()
        return self.session

    def serve(self) -> None:
        """In the main thread: start Ray if the planning thread asked for it."""
        if self.wanted.is_set() and not self.ready.is_set():
            self.get()

    def scan_map(self, func, items: list[tuple]):
        """Planning's map: each item is one task's share of DICOM folders (about FILES_PER_TASK files); one share
        is read in this process, more by Ray tasks anywhere in the cluster, results yielded as they come."""
        if self.in_driver:
            return serial_map(func, items)
        if len(items) > 1:
            self.get()
        return ray_imap(func, items)

    def close(self) -> None:
        self.ready.set()
        if self.session is not None:
            self.session.close()


def _out_inside_input(source: Path, out: Path) -> list[Path]:
    """OUT, left out of every scan (an OUT inside INPUT, or inside a manifest row's folder, holds outputs, not
    inputs); OUT equal to a folder INPUT is refused."""
    if source.is_dir() and out == source:
        raise InputError(f"the output folder is the input folder ({source}): choose another -o")
    return [out]


def _plan(source: Path, out: Path, ray_session, regions, private: bool, stack) -> tuple[Plan, list[str]]:
    """The whole plan at once (--dry-run)."""
    exclude = _out_inside_input(source, out)
    names = Pseudonyms(out) if private else None
    plan = plan_inputs(source, regions, map_fn=ray_session.scan_map, exclude=exclude, names=names, stack=stack)
    notes = [f"OUT {p} is inside INPUT: left out of the input scan" for p in plan.excluded] + plan.renamed
    if names is not None and any(c.private for c in (*plan.cases, *plan.skipped)):
        names.write_key([{"case": c.name, "kind": c.kind, "path": c.path, "series_uid": c.series_uid,
                          "series_number": c.series_number} for c in plan.cases if c.private]
                        + [{"case": s.case, "kind": "refused", "path": s.path, "series_number": s.series_number}
                           for s in plan.skipped if s.private])
    for note in notes:  # warnings, shown with --quiet too
        print(f"mrannotator batch: {note}", file=sys.stderr)
    return plan, notes


def _run(source: Path, out: Path, ray_session: _LazySession, t0: float, *, workers, gpus_per_worker,
         threads_per_worker, regions, fast, retry, quiet, preview, weights, worker_resources, on_record, private,
         dry_run, stack) -> BatchSummary:
    resolved = load_weights(weights)  # a weights problem stops here, before any worker starts
    if dry_run:
        plan, notes = _plan(source, out, ray_session, regions, private, stack)
        tables = {"plan": write_plan(out, plan)}
        return BatchSummary(out, len(plan.cases), 0, 0, len(plan.skipped), 0, 0, time.perf_counter() - t0,
                            tables=tables, sidecars=plan.sidecars, notes=notes, dry_run=True)
    mode = "fast" if fast else "exact"
    version = weights_version(resolved)
    run = {"run": f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
           "weights": f"{resolved.source}:{version}", "weights_version": version, "mode": mode, "stack": stack}

    def key_of(case: Case) -> dict:  # what makes a finished case still valid (besides its input's checksum)
        return {"weights_version": version, "mode": mode, "regions": case.route.label, "stack": stack}

    ledger = Ledger(out)
    feed = PlanFeed(source, out, ray_session.scan_map, regions, Pseudonyms(out) if private else None, stack,
                    ledger.read(), key_of)
    _out_inside_input(source, out)
    remove_stale_temporaries(out)
    worker_args = {"out_dir": str(out), "run": run, "weights": str(resolved.root),
                   "device": "cuda" if gpus_per_worker > 0 else "cpu", "threads": threads_per_worker,
                   "mode": mode, "regions": None if regions in (None, "auto") else list(regions),
                   "preview": preview}
    try:
        n_workers, stats = _process(feed.start(), ledger, run, worker_args, ray_session=ray_session, source=source,
                                    workers=workers, threads_per_worker=threads_per_worker,
                                    gpus_per_worker=gpus_per_worker, worker_resources=worker_resources,
                                    retry=retry, quiet=quiet, on_record=on_record)
    finally:
        feed.stop()
    plan = feed.plan
    refuse_split(feed, ledger, run)
    records = ledger.read()
    current = [rec for c in plan.cases if (rec := records.get(c.name)) and same_key(rec, key_of(c))]
    tables = write_tables(out, current, plan.skipped)
    failed = sum(r.get("status") != "done" for r in current) + len(plan.skipped)
    empty = sum(r.get("status") == "done" and not r.get("rows") for r in current)
    return BatchSummary(out, len(plan.cases), len(feed.done_before), stats["processed"], failed, stats["retried"],
                        n_workers, time.perf_counter() - t0,
                        {k[5:]: v for k, v in stats.items() if k.startswith("node:")}, tables, empty=empty,
                        sidecars=plan.sidecars, notes=feed.notes)


def _paths_to_check(source: Path, out: Path, todo: list[Case], most: int = 50) -> list[str]:
    """INPUT, OUT and the folders of up to ``most`` cases: what every worker must see before it takes a case."""
    paths = dict.fromkeys([str(source), str(out)])
    for c in todo:
        if len(paths) >= most:
            break
        paths.setdefault(str(Path(c.path).parent), None)
    return list(paths)


def _process(feed: PlanFeed, ledger: Ledger, run: dict, worker_args: dict, *, ray_session, source, workers,
             threads_per_worker, gpus_per_worker, worker_resources, retry, quiet, on_record):
    """Run the cases ``feed`` plans on Ray workers (:class:`.pool.Pool`); returns (number of workers, counters)."""
    progress = Progress(0, 0, 0, quiet)
    pool = Pool(ray_session, worker_args, workers, threads_per_worker, gpus_per_worker, worker_resources,
                 early=not feed.records)
    try:
        todo = first_cases(feed, pool, progress)
        if not todo:
            feed.poll()  # planning's own error, if any
            return 0, Counter()
        actors = pool.start(cap=None if workers or not feed.finished.is_set() else len(todo))
        dispatch = _Dispatcher(actors, todo, retry, ledger, run, progress, on_record,
                               in_flight=cases_in_flight(gpus_per_worker),
                               check_paths=_paths_to_check(source, Path(worker_args["out_dir"]), todo), feed=feed)
        dispatch.run()
        return pool.n, dispatch.stats
    except KeyboardInterrupt:
        progress.close()
        print(f"mrannotator batch: interrupted; {ledger.folder} keeps every finished case: run the same "
              "command again to finish the rest", file=sys.stderr)
        raise
    finally:
        pool.close()
        progress.close()


class _Dispatcher:
    """Keeps every live worker fed with ``in_flight`` cases (``cluster.cases_in_flight``) until all cases have a
    record.

    A worker whose process died is left alone while Ray restarts it (calls to a restarting actor fail at once)
    and probed with ``ready()`` every ``PROBE_INTERVAL_S`` until its models are loaded again.
    """

    PROBE_INTERVAL_S = 1.0

    def __init__(self, actors: list, cases: list[Case], retry: int, ledger: Ledger, run: dict, progress,
                 on_record, in_flight: int, check_paths: list[str] = (), feed: PlanFeed | None = None):
        import ray

        self.feed = feed  # more cases as planning goes on

        self.actors = actors
        self.pending = deque((c, 1) for c in cases)
        self.inflight: dict = {}  # object ref -> (case, attempt, worker index)
        self.check_paths = list(check_paths)  # INPUT, OUT...: a worker that cannot see them takes no case
        self.probing = {a.ready.remote(self.check_paths): i for i, a in enumerate(actors)}  # ref -> worker index
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
        while self.pending or self.inflight or (self.feed is not None and not self.feed.exhausted()):
            self._planned(timeout=0.2 if not self.pending and not self.inflight else 0.0)
            self._probe_due()
            if len(self.dead) == len(self.actors):
                raise ClusterError("no batch worker could start:\n  " + "\n  ".join(
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

    def _planned(self, timeout: float) -> None:
        """Cases planned since the last look (waiting up to ``timeout`` for one): queued, handed to idle workers."""
        if self.feed is None:
            return
        new = self.feed.poll(timeout)
        self.progress.add(**self.feed.take_counts())
        if new:
            self.pending.extend((c, 1) for c in new)
            for j in range(len(self.actors)):
                self._feed(j)

    def _probe_due(self) -> None:
        now = time.monotonic()
        for i, when in list(self.probe_later.items()):
            if when <= now:
                del self.probe_later[i]
                self.probing[self.actors[i].ready.remote(self.check_paths)] = i

    def _probed(self, ref) -> None:
        i = self.probing.pop(ref)
        try:
            info = self._ray.get(ref)
        except self._ray.exceptions.ActorUnavailableError:  # still restarting
            self.probe_later[i] = time.monotonic() + self.PROBE_INTERVAL_S
            return
        except self._ray.exceptions.RayError as e:  # e.g. the models could not load on that node
            self.dead[i] = _short(e)
            return
        if info.get("missing"):  # INPUT or OUT not mounted there: no case goes to it
            self.dead[i] = (f"on node {info['host']} ({info['node'][:12]}) these paths do not exist: "
                            f"{', '.join(info['missing'][:3])}: every node must see INPUT and OUT at the same "
                            "paths (a shared file system)")
            print(f"mrannotator batch: worker {i} takes no case: {self.dead[i]}", file=sys.stderr)
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
            if self.feed is not None and case.name in self.feed.split:  # refused once planning is complete
                continue
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
                  "failure": "worker", "header": case.header, "seconds": 0.0, "private": case.private,
                  "series_number": case.series_number,
                  "error": f"the worker process died on each of {attempt} attempts: {_short(error)}",
                  "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        self.ledger.write(record)
        return record


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
