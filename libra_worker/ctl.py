"""`libra-worker ctl`: the operator's view of one device, from state_dir.

Works whether the worker daemon runs or not: everything it shows is read from state_dir
(desired state, job journal, HAProxy's pidfile and events log) and from the running
HAProxy itself (its master CLI and stats socket). Run as root against a worker whose
state_dir belongs to a service user, it re-runs itself as that user (with the service's
CAP_NET_BIND_SERVICE), so the HAProxy it starts or reloads stays the worker's.

Two commands are the systemd units' own (`[haproxy] supervisor = systemd`):
`haproxy-config` (libra-haproxy.service, before HAProxy starts) and `logsink`
(libra-logsink.service, the access-log sink in the foreground).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pwd
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

from libra_worker import logsetup, notify
from libra_worker.config import Config, ConfigError, load
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.drivers.haproxy.process import process_alive
from libra_worker.errors import WorkerError
from libra_worker.journal import JOURNAL_NAME, Journal
from libra_worker.logsink import EVENTS_LOG_NAME, run_sink
from libra_worker.transport import job_server_summary

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# LSB init-script status code for "program is not running".
EXIT_NOT_RUNNING = 3
# How long `haproxy-config` waits for a worker that is changing the file itself.
SYNC_LOCK_TIMEOUT = 5.0

EPILOG = """\
--config FILE may come before or after the command, or before `ctl`
(`libra-worker --config FILE ctl status`).

exit status: 0 done; 1 the command failed (one line on stderr says why);
2 bad command line or configuration; 3 (status) the worker daemon is not running.
"""


class OneLineParser(argparse.ArgumentParser):
    """Bad command lines get one line on stderr and exit 2, not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def command_arguments(argv: list[str]) -> list[str] | None:
    """The arguments for `ctl.main` when a `libra-worker` command line is a `ctl` command,
    else None. `--config FILE` before `ctl` is handed on, so it may stand on either side."""
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "ctl":
            return argv[:index] + argv[index + 1:]
        if word == "--config":
            index += 2
        elif word.startswith("--config="):
            index += 1
        else:
            return None
    return None


def build_parser() -> OneLineParser:
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                               help="the worker's INI file (required)")
    parser = OneLineParser(prog="libra-worker ctl", description=__doc__.splitlines()[0],
                           epilog=EPILOG, parents=[config_option],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text, counted in (
        ("status", "Show the worker daemon, HAProxy's processes, its configuration, the desired "
                   "and the actual state. Exits 3 when the worker daemon is not running.", None),
        ("restart", "Reload HAProxy, not the worker: hitless, on its current configuration "
                    "(outside systemd HAProxy is started if it is not running; under it, "
                    "libra-haproxy.service starts it). Refused while the desired state is "
                    "SUSPENDED or DELETED: send ENABLE or UPDATE instead.", None),
        ("logs", "Show HAProxy's own messages (not the access logs).", "lines"),
        ("jobs", "Show the most recent jobs from the job journal.", "jobs"),
        ("haproxy-config", "Write HAProxy's configuration as the desired state asks (an idle "
                           "one, without listeners, when no load balancer is ACTIVE), checked "
                           "with haproxy -c; HAProxy is not touched. libra-haproxy.service "
                           "runs it before HAProxy starts.", None),
        ("logsink", "Run HAProxy's access-log sink in the foreground, on the socket "
                    "libra-logsink.socket passes (else it binds its own); for "
                    "libra-logsink.service.", None),
    ):
        command = commands.add_parser(name, parents=[config_option], help=text, description=text)
        if counted:
            command.add_argument("-n", type=_count, default=20,
                                 help=f"{counted} (default %(default)s)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "config" not in args:
        parser.error("the following argument is required: --config FILE")
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"libra-worker ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refusal = become_state_dir_owner(config, argv)
    if refusal:
        print(f"libra-worker ctl: {refusal}", file=sys.stderr)
        return EXIT_FAILED
    command: Callable[[Config, argparse.Namespace], int] = {
        "status": status, "restart": restart, "logs": logs_tail, "jobs": jobs_list,
        "haproxy-config": haproxy_config, "logsink": logsink}[args.command]
    try:
        code = command(config, args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (`ctl status | head -1`) has all it wanted; Python would otherwise
        # complain again while flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (WorkerError, OSError) as exc:
        print(f"libra-worker ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def become_state_dir_owner(config: Config, argv: list[str]) -> str | None:
    """As root, re-run this command as the owner of state_dir; None when there is nothing
    to do, else why it cannot (the command must not go on as root).

    An HAProxy that root starts or reloads is root's: the worker can then neither stop
    nor query it. `setpriv` (util-linux) sets the user, its groups and the ambient
    CAP_NET_BIND_SERVICE the service runs with, for ports below 1024.
    """
    if os.geteuid() != 0:
        return None
    try:
        owner = config.worker.state_dir.stat()
    except FileNotFoundError:
        return None
    if owner.st_uid == 0:
        return None
    try:
        user = pwd.getpwuid(owner.st_uid).pw_name
        groups = "--init-groups"
    except KeyError:  # no passwd entry, so no supplementary groups to take
        user, groups = f"uid {owner.st_uid}", "--clear-groups"
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return (f"{config.worker.state_dir} belongs to {user} and setpriv (util-linux) is not "
                "installed to act as that user; run ctl as that user instead of root.")
    sys.stdout.flush()
    try:
        os.execv(setpriv, [setpriv, f"--reuid={owner.st_uid}", f"--regid={owner.st_gid}", groups,
                           "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
                           "--", sys.executable, "-m", "libra_worker.cli", "ctl", *argv])
    except OSError as exc:
        return f"cannot run {setpriv} to act as {user}, who owns {config.worker.state_dir}: {exc.strerror}."
    return None  # not reached: execv replaced this process


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
    return EXIT_OK if daemon_pid else EXIT_NOT_RUNNING


def restart(config: Config, _args: argparse.Namespace) -> int:
    driver = HAProxyDriver(config.haproxy)
    driver.restart()
    print(f"HAProxy serving, master pid {driver.process.master_pid()}")
    return EXIT_OK


def haproxy_config(config: Config, _args: argparse.Namespace) -> int:
    driver = HAProxyDriver(config.haproxy)
    driver.sync_live_config(SYNC_LOCK_TIMEOUT)
    print(f"{driver.files.config} serves the desired state "
          f"({driver.store.load().lifecycle.value})")
    return EXIT_OK


def logsink(config: Config, _args: argparse.Namespace) -> int:
    # The journal under systemd (stderr otherwise), never the worker's own log file.
    logsetup.configure(dataclasses.replace(config.worker, log_file=None, logging_config=None),
                       foreground=True)
    return run_sink(config.worker.state_dir, config.haproxy.log_max_bytes,
                    listening=notify.listened_socket())


def logs_tail(config: Config, args: argparse.Namespace) -> int:
    _print_tail(config.worker.state_dir / "logs" / EVENTS_LOG_NAME, args.n)
    return EXIT_OK


def jobs_list(config: Config, args: argparse.Namespace) -> int:
    records = Journal(config.worker.state_dir / JOURNAL_NAME).recent(args.n)
    print(f"{'started (UTC)':<20} {'state':<8} {'action':<9} {'ms':>8}  handle / error")
    for record in records:
        duration = f"{record.duration_ms:.1f}" if record.duration_ms is not None else "-"
        detail = record.handle + (f"  {record.hpcs_error}" if record.hpcs_error else "")
        print(f"{record.started:<20} {record.state:<8} {record.action:<9} {duration:>8}  {detail}")
    return EXIT_OK


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a positive whole number")
    return int(text)


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
