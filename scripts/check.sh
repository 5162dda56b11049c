#!/usr/bin/env bash
# Lint, type-check and test.  Run scripts/setup.sh --dev first.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
# Two workers (pytest-xdist), one test file each at a time: most of the suite's time is real server
# and client processes waiting on each other, which a second worker overlaps even on two cores.
# Module- and session-scoped fixtures stay shared within a file. Later options win: pass `-n 0`
# to run in one process.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
