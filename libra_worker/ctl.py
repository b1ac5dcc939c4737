"""`libra-worker ctl`: the operator's view of one device, from state_dir.

Works whether the worker daemon runs or not: everything it shows is read from state_dir
(desired state, job journal, HAProxy's pidfile and events log) and from the running
HAProxy itself (its master CLI and stats socket).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections import deque
from pathlib import Path

from libra_worker.config import Config, ConfigError, load
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.drivers.haproxy.process import process_alive
from libra_worker.errors import WorkerError
from libra_worker.journal import JOURNAL_NAME, Journal
from libra_worker.logsink import EVENTS_LOG_NAME
from libra_worker.transport import job_server_summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="libra-worker ctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="the worker's INI file")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="HAProxy's processes, configuration and state")
    commands.add_parser("restart", help="reload HAProxy (start it if it is not running)")
    logs = commands.add_parser("logs", help="HAProxy's own messages (not access logs)")
    logs.add_argument("-n", type=int, default=20, help="lines (default %(default)s)")
    jobs = commands.add_parser("jobs", help="the most recent jobs")
    jobs.add_argument("-n", type=int, default=20, help="jobs (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        return {"status": status, "restart": restart, "logs": logs_tail, "jobs": jobs_list}[
            args.command
        ](config, args)
    except (ConfigError, WorkerError, OSError) as exc:
        print(f"libra-worker ctl: {exc}", file=sys.stderr)
        return 1


def status(config: Config, _args: argparse.Namespace) -> int:
    driver = HAProxyDriver(config.haproxy)
    desired = driver.store.load()
    master = driver.process.master_pid()
    workers = [pid for pid in driver.process.our_pids() if pid != master]
    daemon_pid = _pid_from(config.worker.pid_file)
    rows = [
        ("worker daemon", f"running, pid {daemon_pid}" if daemon_pid else "not running"),
        ("desired state", f"{desired.lifecycle.value} since {desired.since}"),
        ("actual state", "HAProxy running" if master else "HAProxy not running"),
        ("haproxy master", f"pid {master}, up {_uptime(master)}" if master else "-"),
        ("haproxy workers", ", ".join(map(str, workers)) or "-"),
        ("config", _checksum(driver.files.config)),
        ("restarts", str(desired.restarts)),
        ("last error", desired.last_error or "-"),
        ("log sink", f"pid {driver.logs.pid()}" if driver.logs.pid() else "not running"),
        ("job servers", job_server_summary(config.gearman.status_file)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\nrecent HAProxy messages:")
    _print_tail(driver.logs.log_dir / EVENTS_LOG_NAME, 5)
    return 0


def restart(config: Config, _args: argparse.Namespace) -> int:
    driver = HAProxyDriver(config.haproxy)
    driver.restart()
    print(f"HAProxy serving, master pid {driver.process.master_pid()}")
    return 0


def logs_tail(config: Config, args: argparse.Namespace) -> int:
    _print_tail(config.worker.state_dir / "logs" / EVENTS_LOG_NAME, args.n)
    return 0


def jobs_list(config: Config, args: argparse.Namespace) -> int:
    records = Journal(config.worker.state_dir / JOURNAL_NAME).recent(args.n)
    print(f"{'started (UTC)':<20} {'state':<8} {'action':<9} {'ms':>8}  handle / error")
    for record in records:
        duration = f"{record.duration_ms:.1f}" if record.duration_ms is not None else "-"
        detail = record.handle + (f"  {record.hpcs_error}" if record.hpcs_error else "")
        print(f"{record.started:<20} {record.state:<8} {record.action:<9} {duration:>8}  {detail}")
    return 0


def _print_tail(path: Path, count: int) -> None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = deque(handle, maxlen=count)
    except FileNotFoundError:
        print(f"  (no messages yet: {path} does not exist)")
        return
    for line in lines:
        print("  " + line.rstrip("\n"))


def _pid_from(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if process_alive(pid) else None


def _uptime(pid: int) -> str:
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot_seconds = float(Path("/proc/uptime").read_text().split()[0])
    seconds = int(boot_seconds - ticks / os.sysconf("SC_CLK_TCK"))
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + (f" (+{seconds // 86400}d)" if seconds >= 86400 else "")


def _checksum(path: Path) -> str:
    try:
        return "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()[:16] + f"  ({path})"
    except FileNotFoundError:
        return f"none ({path} does not exist)"
