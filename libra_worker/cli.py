"""libra-worker: the daemon's command line.

`libra-worker --config FILE` daemonizes with python-daemon and returns once the daemon
serves (see `service`); `--foreground` stays attached, for systemd (Type=notify) and for
tests. Either way the steps are the same: check the configuration, prepare directories
and drop privileges, take the pidfile, set up logging, put the load balancer back into
its desired state, then serve jobs until SIGTERM/SIGINT. The first signal finishes the
job in hand (warm shutdown); a second one exits at once (cold). SIGHUP re-opens the log
files. HAProxy keeps serving after the worker exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from libra_worker import __version__, ctl, logsetup, notify, service, transport
from libra_worker.config import Config, ConfigError, load
from libra_worker.controller import LBaaSController
from libra_worker.diagnostics import Diagnostics
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.errors import WorkerError
from libra_worker.jobs import JobRunner
from libra_worker.journal import JOURNAL_NAME, Journal
from libra_worker.reconciler import Reconciler
from libra_worker.service import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Identity, PidFile, StartupError

LOG = logging.getLogger("libra_worker")
# Without systemd's watchdog, a loop idle this long is reported as stalled in STATUS.
_STALL_LIMIT = 60.0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    ctl_arguments = ctl.command_arguments(arguments)
    if ctl_arguments is not None:
        return ctl.main(ctl_arguments)
    parser = argparse.ArgumentParser(
        prog="libra-worker",
        description=__doc__.splitlines()[0],
        epilog=f"{service.EXIT_STATUS_HELP} Signals: SIGTERM/SIGINT finish the job in hand, "
               "then exit (a second one exits at once); SIGHUP re-opens the log files and "
               "re-reads logging_config. "
               "Operators: `libra-worker ctl --config FILE status|restart|logs|jobs`.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the worker's INI file")
    parser.add_argument("--foreground", action="store_true",
                        help="do not daemonize (systemd Type=notify, tests)")
    parser.add_argument("--version", action="version", version=f"libra-worker {__version__}")
    args = parser.parse_args(arguments)
    try:
        config = load(args.config)
        identity = preflight(config)
    except (ConfigError, logsetup.LoggingSetupError) as exc:
        service.print_error(exc)
        return EXIT_CONFIG
    except StartupError as exc:
        service.print_error(exc)
        return exc.exit_code
    if args.foreground:
        return run(config, identity, service.ConsoleReport(), foreground=True)
    return service.daemonize(config, lambda report: run(config, identity, report, foreground=False))


def preflight(config: Config) -> Identity:
    """The checks that need neither the service user nor the daemon; who to run as."""
    identity = service.resolve_identity(config.worker)
    if config.worker.logging_config is None:
        logsetup.check_level(config.worker.log_level)
    service.check_job_servers(config)
    holder = PidFile(config.worker.pid_file).holder()
    if holder is not None:
        raise service.already_running(config.worker.pid_file, holder)
    return identity


def run(config: Config, identity: Identity, report: service.StartupReport, foreground: bool) -> int:
    """The worker's life: start up, install signal handlers, serve, tear down."""
    notifier = notify.Notifier.from_environment()
    watchdog = notify.watchdog_interval()
    stopping = threading.Event()
    progress = notify.Progress(
        limit=watchdog or _STALL_LIMIT,
        reconcile_interval=config.worker.reconcile_interval,
        job_limit=max([config.timeouts.default, *config.timeouts.per_action.values()]),
    )
    reopener = logsetup.LogReopener(config.worker, foreground)

    def on_stop(sentence: str) -> None:
        progress.reconciler_stopped = True  # it ends its loop on the same event
        LOG.info("%s", sentence)
        notifier.stopping("stopping: finishing the job in hand; HAProxy keeps serving")

    service.install_signal_handlers(stopping, on_stop, reopener.request)
    pidfile = PidFile(config.worker.pid_file)
    try:
        start(config, identity, pidfile, foreground)
    except StartupError as exc:
        pidfile.release()
        if logging.getLogger().handlers:
            LOG.error("Not starting: %s", exc)
        report.failed(exc)
        return exc.exit_code
    reopener.start()
    service.log_thread_failures()
    try:
        return serve(config, report, notifier, progress, watchdog, stopping)
    finally:
        pidfile.release()


def start(config: Config, identity: Identity, pidfile: PidFile, foreground: bool) -> None:
    """Directories (as root), then as the service user: access, pidfile, logging."""
    try:
        service.prepare_directories(config.worker, identity)
        if not foreground:
            os.chdir(config.worker.state_dir)  # a daemon holds no other directory busy
        service.drop_privileges(identity)
        service.check_access(config, identity)
        pidfile.acquire()
        logsetup.configure(config.worker, foreground)
        if os.geteuid() == 0:
            LOG.warning("Running as root: set [worker] user (or the unit's User=) to a service user")
    except logsetup.LoggingSetupError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:  # a chown or setuid refused: name what we were doing
        raise StartupError(f"[worker] user/group: cannot prepare for user {identity.name}: "
                           f"{exc.strerror}.") from None


def serve(config: Config, report: service.StartupReport, notifier: notify.Notifier,
          progress: notify.Progress, watchdog: float | None, stopping: threading.Event) -> int:
    LOG.info("libra-worker %s starting, state in %s", __version__, config.worker.state_dir)
    serving = threading.Event()
    try:
        driver = HAProxyDriver(config.haproxy)

        def describe() -> str:
            if not serving.is_set():
                return "starting: restoring the desired state"
            servers = ", ".join(f"{host}:{port}" for host, port in config.gearman.servers)
            return (f"serving function {config.gearman.function!r} on job servers {servers}; "
                    f"LB {driver.store.load().lifecycle.value}")

        # Started now: systemd's watchdog may already run while the state is restored,
        # which counts as a job in hand (bounded by the longest job timeout).
        notify.ServiceMonitor(notifier, progress, describe, watchdog, stopping).start()
        notifier.status(describe())
        with progress.job():
            try:
                driver.restore()
            except WorkerError as exc:
                # Keep serving jobs: an UPDATE or ENABLE can still repair the device.
                LOG.error("Could not restore the desired state: %s", exc)
        progress.reconciled()  # restoring was a reconcile round

        def reconcile() -> None:
            try:
                driver.reconcile()
            finally:  # a failed round is logged by the reconciler; the loop still moved
                progress.reconciled()

        Reconciler(reconcile, config.worker.reconcile_interval, stopping).start()
        runner = JobRunner(
            LBaaSController(driver, Diagnostics(config.gearman.servers, config.diagnostics),
                            config.worker.max_message_bytes),
            Journal(config.worker.state_dir / JOURNAL_NAME, config.worker.journal_entries),
            config.timeouts.per_action,
            config.timeouts.default,
        )

        def heartbeat() -> None:
            progress.polled()
            if not serving.is_set() and not stopping.is_set():  # the first poll: serving
                serving.set()
                LOG.info("Ready: %s", describe())
                report.ready()
                notifier.ready(describe())

        transport.serve(config.gearman, runner, stopping, heartbeat, progress.job)
    except Exception:
        LOG.exception("libra-worker stopped on an unexpected error")
        report.failed(StartupError("stopped on an unexpected error; see its log.", EXIT_FAILURE))
        notifier.stopping("stopped on an unexpected error; see the log")
        return EXIT_FAILURE
    notifier.stopping("stopped; HAProxy keeps serving")
    LOG.info("libra-worker stopped; HAProxy keeps serving")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
