"""The batch's progress line: cases accounted for / total, cases per minute, ETA and failures, on one line of stderr.

``total`` counts every input case (those the plan refused too), and ``failed`` starts at the refused ones and
those whose refusal the ledger kept, so the live count of failures is the one the run ends with (cases.csv).
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Nothing when ``quiet``; one redrawn line on a terminal, one line per case in a log file."""

    def __init__(self, total: int, already: int, failed: int, quiet: bool):
        from tqdm import tqdm

        self.failed = failed
        self.t0 = time.monotonic()
        self.done_here = 0
        self.live = sys.stderr.isatty()  # a log file gets one line per case, not a redraw every half second
        self.bar = tqdm(total=total, initial=already, disable=quiet, file=sys.stderr, unit="case", smoothing=0.1,
                        mininterval=0.5 if self.live else 0.0,
                        bar_format="{n}/{total} cases |{bar:20}| {elapsed} elapsed, ETA {remaining}{postfix}")
        self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)

    def add(self, total: int = 0, already: int = 0, failed: int = 0) -> None:
        """More input cases planned: ``already`` of them accounted for (done before or refused), ``failed`` of
        those refused or failed before."""
        if not (total or already or failed):
            return
        self.failed += failed
        self.bar.total = (self.bar.total or 0) + total
        self.bar.n += already
        self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
        self.refresh()

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
