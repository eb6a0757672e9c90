"""The plan, streamed to the dispatcher: cases are handed out as soon as their folder's headers are read.

Planning runs in a thread of the driver (reading headers itself for a small tree, waiting on Ray tasks for a large
one) while the main thread starts the workers and dispatches. Each part of the plan is checked against the ledger
as it arrives (records still valid, outputs intact, input checksums unchanged): what is done already is counted,
the rest is queued. The whole plan is kept (a few paths per case) for the tables at the end, and the private
names' key is written as the plan grows (at most every ``KEY_EVERY_S``, and once complete), so that an
interrupted run leaves a key for every case it wrote.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from datetime import UTC, datetime

from .inputs import Case, Plan, join_part, plan_stream, split_skip
from .ledger import FINAL_FAILURE, Ledger, finished_cases, input_checksum
from .naming import Pseudonyms

KEY_EVERY_S = 10.0


class PlanFeed:
    """``plan_stream`` in a thread; :meth:`poll` returns the cases to process planned since the last call."""

    def __init__(self, source, out, map_fn, regions, names: Pseudonyms | None, stack, records: dict, key_of):
        self.args = (source, regions, map_fn, [out], names, stack)
        self.out, self.names, self.records, self.key_of = out, names, records, key_of
        self.plan = Plan([], [])
        self.done_before: set[str] = set()
        self.notes: list[str] = []
        self.counts = {"total": 0, "already": 0, "failed": 0}  # not yet taken by the progress line
        self.split: set[str] = set()  # cases not to dispatch (their series is split across folders)
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._todo: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._key_written = 0.0
        self._thread = threading.Thread(target=self._run, name="mrannotator-plan", daemon=True)

    def start(self) -> PlanFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            for part in plan_stream(*self.args):
                if self._stop.is_set():
                    return
                self._take(part)
            self._write_key(force=True)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            self.error = e
        finally:
            self.finished.set()
            self._todo.put(None)  # wakes a waiting poll

    def _take(self, part: Plan) -> None:
        for note in [f"OUT {p} is inside INPUT: left out of the input scan" for p in part.excluded] + part.renamed:
            print(f"mrannotator batch: {note}", file=sys.stderr)  # warnings, shown with --quiet too
            self.notes.append(note)
        done = finished_cases(part.cases, self.records, self.key_of, self.out)
        with self._lock:
            join_part(self.plan, part)
            self.done_before |= done
            self.split.update(part.split)
            self.counts["total"] += len(part.cases) + len(part.skipped)
            self.counts["already"] += len(done) + len(part.skipped)
            self.counts["failed"] += len(part.skipped) + sum(self.records[n].get("status") != "done" for n in done)
        for c in part.cases:
            if c.name not in done:
                self._todo.put(c)
        self._write_key()

    def poll(self, timeout: float = 0.0) -> list[Case]:
        """Cases planned and not done before, since the last call (waiting up to ``timeout`` for the first)."""
        out: list[Case] = []
        try:
            item = self._todo.get(timeout=timeout) if timeout > 0 else self._todo.get_nowait()
            while True:
                if item is not None:
                    out.append(item)
                item = self._todo.get_nowait()
        except queue.Empty:
            pass
        if self.error is not None:
            raise self.error
        return out

    def exhausted(self) -> bool:
        """Planning finished and every planned case handed out by :meth:`poll`."""
        return self.finished.is_set() and self._todo.empty()

    def take_counts(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = self.counts, {"total": 0, "already": 0, "failed": 0}
        return counts

    def _write_key(self, force: bool = False) -> None:
        if self.names is None or not (force or time.monotonic() - self._key_written > KEY_EVERY_S):
            return
        with self._lock:
            plan = self.plan
            rows = ([{"case": c.name, "kind": c.kind, "path": c.path, "series_uid": c.series_uid,
                      "series_number": c.series_number} for c in plan.cases if c.private]
                    + [{"case": s.case, "kind": "refused", "path": s.path, "series_number": s.series_number}
                       for s in plan.skipped if s.private])
        if rows:
            self.names.write_key(rows)
        self._key_written = time.monotonic()


def refuse_split(feed: PlanFeed, ledger: Ledger, run: dict) -> int:
    """The first folder of each series split across folders (planned, maybe segmented before the split showed):
    a refused record in the ledger (kept by the next run while the input is unchanged) and no outputs."""
    n = 0
    for case in (c for c in feed.plan.cases if c.name in feed.split):
        old = ledger.read_one(case.name) or {}
        for name in (old.get("outputs") or {}).values():
            (feed.out / name).unlink(missing_ok=True)
        ledger.write({"case": case.name, "path": case.path, "kind": case.kind, "regions": case.route.label,
                      "routed_by": case.route.reason, **run, "attempt": 0, "status": "failed",
                      "failure": FINAL_FAILURE, "header": case.header, "seconds": 0.0, "private": case.private,
                      "series_number": case.series_number, "checksum": input_checksum(case.files),
                      "error": split_skip(case, "another folder").error,
                      "finished": datetime.now(UTC).isoformat(timespec="seconds")})
        n += 1
    return n
