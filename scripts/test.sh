#!/usr/bin/env bash
# Install, lint and run the whole test suite (every lane: unit, server, pacs, browser, cluster, study).
#
#   bash scripts/test.sh                 # the whole suite, in two phases (below)
#   bash scripts/test.sh tests/test_x.py # pytest with these arguments, one process (no phases)
#
# Phase 1 runs every module not marked `exclusive` on two pytest-xdist workers (a module stays on one worker,
# so its fixtures start once); phase 2 runs the exclusive modules alone: the cluster lane and the modules that
# bound an answer time (tests/conftest.py). Skip reasons are printed (-rs) and, at the end, the
# 25 slowest tests of both phases (scripts/slowest.py); with CI set, any skip fails the run (tests/conftest.py).
# MRANNOTATOR_TEST_BASETEMP=DIR keeps each phase's test folders under DIR/parallel and DIR/exclusive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
PYTEST=(.venv/bin/python -m pytest -q -rs -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
    exec "${PYTEST[@]}" --durations=25 "$@"
fi
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
base=()
phase() {  # phase NAME: the basetemp option for it, when MRANNOTATOR_TEST_BASETEMP is set
    base=()
    if [ -n "${MRANNOTATOR_TEST_BASETEMP:-}" ]; then
        mkdir -p "$MRANNOTATOR_TEST_BASETEMP"
        base=("--basetemp=$MRANNOTATOR_TEST_BASETEMP/$1")
    fi
}
start=$(date +%s)
rc=0
phase parallel
echo "== phase 1: modules that may share the machine, on 2 workers"
"${PYTEST[@]}" -n 2 --dist loadfile -m "not exclusive" --junitxml="$reports/parallel.xml" "${base[@]}" || rc=$?
phase exclusive
echo "== phase 2: modules that run alone (Ray on the whole machine, answer-time bounds)"
"${PYTEST[@]}" -m exclusive --junitxml="$reports/exclusive.xml" "${base[@]}" || rc=$((rc ? rc : $?))
.venv/bin/python scripts/slowest.py "$reports/parallel.xml" "$reports/exclusive.xml"
echo "== whole suite: $(( $(date +%s) - start )) s; exit code $rc"
exit "$rc"
