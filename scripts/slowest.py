"""The slowest tests of one or more pytest JUnit XML reports (scripts/test.sh's two phases), with the totals.

    python scripts/slowest.py parallel.xml exclusive.xml [--top 25]

A test's time is its setup + call + teardown (pytest's JUnit default); a module fixture's start is in the
time of the first test that uses it.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def cases(report: Path) -> list[tuple[float, str, str]]:
    """(seconds, test id, outcome) of every test case in the report."""
    out = []
    for case in ET.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        out.append((float(case.get("time", 0)), name, outcome))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    everything = []
    for report in args.reports:
        if not report.is_file():
            print(f"{report}: no report (that phase did not finish)")
            continue
        found = cases(report)
        counts = {k: sum(1 for c in found if c[2] == k) for k in ("passed", "failure", "error", "skipped")}
        print(f"{report.stem}: {len(found)} tests, {sum(c[0] for c in found):.0f} s of test time, {counts}")
        everything += [(s, n, o, report.stem) for s, n, o in found]
    print(f"== {args.top} slowest tests (setup + call + teardown)")
    for seconds, name, outcome, phase in sorted(everything, reverse=True)[: args.top]:
        print(f"{seconds:8.1f}s  {phase:9s} {outcome:7s} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
