#!/usr/bin/env bash
# One command from a fresh Debian machine to a real, running worker:
#   scripts/run-worker.sh [start]   set up, start gearmand on 127.0.0.1:4730, start the worker
#                                   (daemonized, python-daemon), HAProxy listening on 127.0.0.1
#   scripts/run-worker.sh stop      stop the worker and gearmand (HAProxy is stopped too)
# Runtime files go to ./run/ (override with LIBRA_RUN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=$(realpath -m "${LIBRA_RUN_DIR:-run}")
function=${LIBRA_FUNCTION:-$(hostname)}
port=${GEARMAN_PORT:-4730}

stop_pidfile() {  # stop the process named by a pidfile, by pid
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

if [[ "${1:-start}" == "stop" ]]; then
    stop_pidfile "$run_dir/worker.pid"
    [[ -d "$run_dir/state" ]] && .venv/bin/python - "$run_dir/state" <<'PY'
import sys
from pathlib import Path
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.config import HAProxySettings
driver = HAProxyDriver(HAProxySettings(state_dir=Path(sys.argv[1])))
driver.process.stop()
driver.logs.stop()
PY
    stop_pidfile "$run_dir/gearmand.pid"
    echo "stopped"
    exit 0
fi

bash scripts/setup.sh
mkdir -p "$run_dir/state"
if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    gearmand --daemon --listen 127.0.0.1 --port "$port" \
        --pid-file "$run_dir/gearmand.pid" --log-file "$run_dir/gearmand.log"
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
fi
cat > "$run_dir/worker.conf" <<CONF
[gearman]
servers = 127.0.0.1:$port
function = $function
[worker]
state_dir = $run_dir/state
pid_file = $run_dir/worker.pid
log_file = $run_dir/worker.log
[haproxy]
bind_address = 127.0.0.1
CONF
.venv/bin/libra-worker --config "$run_dir/worker.conf"
for _ in $(seq 50); do [[ -s "$run_dir/worker.pid" ]] && break; sleep 0.1; done
echo "libra-worker is running (pid $(cat "$run_dir/worker.pid")), serving function '$function'"
echo "  ask it:   .venv/bin/libra-client --servers 127.0.0.1:$port $function DISCOVER"
echo "  its log:  $run_dir/worker.log"
echo "  stop:     scripts/run-worker.sh stop"
