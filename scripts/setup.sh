#!/usr/bin/env bash
# Everything libra-worker needs on a fresh Debian 12 machine: system packages and a
# virtualenv (.venv) with the worker installed. Safe to run again: it skips what is there.
#   scripts/setup.sh           the worker and its runtime (haproxy, gearmand)
#   scripts/setup.sh --test    also what the test suite runs (Swift, memcached, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

runtime_packages=(haproxy gearman-job-server gearman-tools python3-venv python3-pip)
test_packages=(swift swift-proxy swift-account swift-container swift-object memcached wrk stunnel4 iproute2)
# systemd-analyze judges the unit, logrotate rotates for real (no systemd is started).
test_packages+=(systemd logrotate)

packages=("${runtime_packages[@]}")
extras=""
if [[ "${1:-}" == "--test" ]]; then
    packages+=("${test_packages[@]}")
    extras="[test]"
fi

bash scripts/apt-install.sh setup "${packages[@]}"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check ".${extras}"
# sed reads all of haproxy's output: `head -1` would end it with SIGPIPE (a failure under pipefail).
haproxy=$(PATH="$PATH:/usr/sbin" command -v haproxy)
echo "setup: ready ($(.venv/bin/libra-worker --version), $("$haproxy" -v | sed -n 1p))"
