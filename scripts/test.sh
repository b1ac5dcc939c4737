#!/usr/bin/env bash
# One command for the whole test suite on a fresh machine: set-up, then unit and
# integration tests against real gearmand, HAProxy and Swift (started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# HAProxy sends one log datagram per request; the kernel's default queue of 10 datagrams
# drops lines under bursts. Raise it where we may (root); tests do not depend on it.
if [[ $(id -u) -eq 0 ]]; then
    sysctl -q -w net.unix.max_dgram_qlen=512 2>/dev/null || true
fi
# No arguments: the whole suite. Otherwise exactly the pytest arguments given, so
# `scripts/test.sh tests/unit -q` runs the unit tests only (name `tests` to add options to
# the whole suite: `scripts/test.sh -q tests`).
if [[ $# -eq 0 ]]; then
    set -- tests
fi
# -p no:cacheprovider: a clean clone stays clean. `python -m pytest` puts the checkout first
# on sys.path, so the tests exercise the source tree with .venv's dependencies.
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
