"""libra-worker: the daemon's command line.

`libra-worker --config FILE` daemonizes with python-daemon (pidfile, umask, working
directory, optional user/group); `--foreground` stays attached, for systemd's
Type=simple and for tests. Either way the steps are the same: load the config, set up
logging, put the load balancer back into its desired state, then serve jobs until
SIGTERM/SIGINT. The first signal finishes the job in hand (warm shutdown); a second one
exits at once (cold). HAProxy keeps serving after the worker exits.
"""

from __future__ import annotations

import argparse
import grp
import logging
import logging.config
import logging.handlers
import os
import pwd
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import daemon
import daemon.pidfile
import lockfile

from libra_worker import __version__, ctl, transport
from libra_worker.config import Config, ConfigError, load
from libra_worker.controller import LBaaSController
from libra_worker.diagnostics import Diagnostics
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.drivers.haproxy.process import process_alive
from libra_worker.errors import WorkerError
from libra_worker.jobs import JobRunner
from libra_worker.journal import JOURNAL_NAME, Journal
from libra_worker.reconciler import Reconciler
from libra_worker.tls import check_tls_files

LOG = logging.getLogger("libra_worker")
_PIDFILE_TIMEOUT = 2


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    ctl_arguments = ctl.command_arguments(arguments)
    if ctl_arguments is not None:
        return ctl.main(ctl_arguments)
    parser = argparse.ArgumentParser(
        prog="libra-worker",
        description=__doc__.splitlines()[0],
        epilog="Operators: `libra-worker ctl --config FILE status|restart|logs|jobs`.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the worker's INI file")
    parser.add_argument("--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("--version", action="version", version=f"libra-worker {__version__}")
    args = parser.parse_args(arguments)
    try:
        config = load(args.config)
        check_tls_files(config.gearman)
        config.worker.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    except (ConfigError, OSError) as exc:
        print(f"libra-worker: {exc}", file=sys.stderr)
        return 2
    pidfile = worker_pidfile(config.worker.pid_file)
    try:
        if args.foreground:
            with pidfile:
                return run(config, log_to_stderr=True)
        with daemon_context(config, pidfile):
            return run(config, log_to_stderr=False)
    except lockfile.LockTimeout:
        print(f"libra-worker: another worker holds {config.worker.pid_file} "
              f"(pid {pidfile.read_pid()}); one worker per state_dir.", file=sys.stderr)
        return 2


def worker_pidfile(path: Path) -> daemon.pidfile.TimeoutPIDLockFile:
    """The worker's pidfile lock; a file left by a killed worker is cleared first."""
    pidfile = daemon.pidfile.TimeoutPIDLockFile(str(path), _PIDFILE_TIMEOUT)
    pid = pidfile.read_pid()
    if pid is not None and not process_alive(pid):
        pidfile.break_lock()
    return pidfile


def daemon_context(config: Config, pidfile: daemon.pidfile.TimeoutPIDLockFile) -> daemon.DaemonContext:
    settings = config.worker
    context = daemon.DaemonContext(
        working_directory=str(settings.state_dir),
        umask=settings.umask,
        pidfile=pidfile,
        # Our own handlers are installed in run(); python-daemon's would exit at once.
        signal_map={signal.SIGTERM: None, signal.SIGINT: None},
    )
    if settings.user:
        context.uid = pwd.getpwnam(settings.user).pw_uid
        context.gid = pwd.getpwnam(settings.user).pw_gid
    if settings.group:
        context.gid = grp.getgrnam(settings.group).gr_gid
    return context


def run(config: Config, log_to_stderr: bool) -> int:
    """The worker's life: bootstrap, install signal handlers, serve, tear down."""
    configure_logging(config, log_to_stderr)
    stopping = threading.Event()
    install_signal_handlers(stopping)
    LOG.info("libra-worker %s starting, state in %s", __version__, config.worker.state_dir)
    try:
        driver = HAProxyDriver(config.haproxy)
        try:
            driver.restore()
        except WorkerError as exc:
            # Keep serving jobs: an UPDATE or ENABLE can still repair the device.
            LOG.error("Could not restore the desired state: %s", exc)
        Reconciler(driver.reconcile, config.worker.reconcile_interval, stopping).start()
        runner = JobRunner(
            LBaaSController(driver, Diagnostics(config.gearman.servers, config.diagnostics)),
            Journal(config.worker.state_dir / JOURNAL_NAME, config.worker.journal_entries),
            config.timeouts.per_action,
            config.timeouts.default,
        )
        transport.serve(config.gearman, runner, stopping)
    except Exception:
        LOG.exception("libra-worker stopped on an unexpected error")
        return 1
    LOG.info("libra-worker stopped; HAProxy keeps serving")
    return 0


def install_signal_handlers(stopping: threading.Event) -> None:
    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            LOG.warning("Second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        LOG.info("%s: finishing the job in hand, then exiting", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def configure_logging(config: Config, log_to_stderr: bool) -> None:
    settings = config.worker
    if settings.logging_config is not None:
        logging.config.fileConfig(settings.logging_config, disable_existing_loggers=False)
        return
    handler: logging.Handler
    if settings.log_file is not None:
        # Reopens the file after logrotate moves it.
        handler = logging.handlers.WatchedFileHandler(settings.log_file)
    elif log_to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.WatchedFileHandler(settings.state_dir / "worker.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


if __name__ == "__main__":
    sys.exit(main())
