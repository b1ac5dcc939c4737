"""The HAProxy driver: each action as a short list of named steps.

Applying a configuration is always: render -> write candidate -> `haproxy -c` -> swap the
live file atomically -> bring the running HAProxy to it -> record the desired state. A
change of nodes only is brought through the Runtime API (see `runtime`); anything else,
or a runtime change that did not verify, by a master-worker reload (or a start). If any
step fails, the previous file is put back and HAProxy keeps serving it.

A change of nodes only skips the synchronous `haproxy -c`: its file differs from the
checked live one in server lines only, and tests/integration/test_server_lines.py proves
with the real `haproxy -c` that the validator and the shipped template make only server
lines HAProxy accepts. An operator's own template is not covered by that proof, so with
one every UPDATE is checked. The state file is the commit point: a restart re-renders the
live file from it if they differ (`_undo_interrupted_update`). The server slots
(slots.py: which server line serves which node, and the spares) are part of what the
file renders, so they are saved in the state file with the UPDATE.

Who keeps HAProxy and its log sink alive is `[haproxy] supervisor`. With "worker" the driver
starts them, restarts them when they die (`reconcile`) and stops HAProxy for SUSPEND and
DELETE. With "systemd" they are units of their own that outlive the worker
(etc/libra-haproxy.service, etc/libra-logsink.socket): the driver never starts, stops or
signals them; HAProxy always runs, and the live file is what the desired state serves, an
idle configuration without listeners while the load balancer is not ACTIVE
(`_serving_text`). Every change still reaches HAProxy through its master CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Iterator

from libra_worker import archive
from libra_worker.config import HAProxySettings
from libra_worker.drivers.base import DeviceHealth, DeviceStats, LoadBalancerDriver, NodeStatus
from libra_worker.drivers.haproxy import cookie_key, render, runtime, slots
from libra_worker.drivers.haproxy.process import ConfigChecker, HAProxyProcess, find_binary
from libra_worker.drivers.haproxy.sockets import ServerStatus, StatusQuery, dropped_logs
from libra_worker.errors import (
    ActionTimeout,
    ConfigCheckFailed,
    InvalidMessage,
    StatsUnavailable,
    WorkerError,
)
from libra_worker.fileutil import atomic_write, restrict_directory
from libra_worker.logsink import LogSink
from libra_worker.messages import ArchiveRequest, Device, Node, device_document, parse_device
from libra_worker.netcheck import bind_problem
from libra_worker.metrics import MetricsLedger, MetricsPeriod, TrafficTotals
from libra_worker.reconciler import Repair, decide
from libra_worker.state import DesiredState, Lifecycle, StateStore, utc_now

LOG = logging.getLogger(__name__)
# What HAProxy serves under systemd while no load balancer is ACTIVE: no listener at all.
IDLE_DEVICE = Device(loadbalancers=())


class StateDirLayout:
    """Every file the driver owns, in one place."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.config = state_dir / "haproxy.cfg"
        self.candidate = state_dir / "haproxy.cfg.new"
        self.rejected = state_dir / "haproxy.cfg.failed"
        self.pid_file = state_dir / "haproxy.pid"
        self.master_socket = state_dir / "haproxy-master.sock"
        self.stats_socket = state_dir / "haproxy-stats.sock"
        self.state = state_dir / "state.json"
        self.cookie_key = state_dir / "cookie.key"


class HAProxyDriver(LoadBalancerDriver):
    def __init__(self, settings: HAProxySettings) -> None:
        self.settings = settings
        self.files = StateDirLayout(settings.state_dir)
        self.store = StateStore(self.files.state)
        self.logs = LogSink(settings.state_dir, settings.log_max_bytes)
        self.metrics_ledger = MetricsLedger(settings.state_dir, self.logs.log_dir)
        self.process = HAProxyProcess(
            binary=find_binary(settings.binary),
            config_file=self.files.config,
            pid_file=self.files.pid_file,
            master_socket=self.files.master_socket,
            command_timeout=settings.command_timeout,
            stop_grace=settings.stop_grace,
            reload_attempts=settings.reload_attempts,
            reload_retry_wait=settings.reload_retry_wait,
        )
        self.templates = render.template_environment(settings.template_dir)
        self.persistence = render.Persistence(
            http_cookie=settings.http_cookie_persistence,
            tcp_source=settings.tcp_source_persistence,
            peer=settings.peers_address,
            cookie_key=(cookie_key.load_or_create(self.files.cookie_key)
                        if settings.http_cookie_persistence else None),
        )
        self.endpoint_policy = archive.EndpointPolicy(
            settings.archive_allowed_endpoints, settings.archive_allow_plain_http
        )
        # Jobs, the reconciler and `ctl restart` (another process) must not interleave
        # their file swaps and reloads.
        self._lock = threading.RLock()
        self._lock_file = settings.state_dir / "driver.lock"
        self._lock_depth = 0
        self._lock_fd = -1
        # The last accepted Device and its slot layout, parsed once per state-file version.
        self._accepted: tuple[DesiredState, Device | None, slots.Layout | None] | None = None
        # The configuration text last rendered for an accepted Device.
        self._rendered: tuple[Device, str] | None = None
        if settings.consolidate_after_given:
            LOG.warning("[haproxy] consolidate_after is obsolete and ignored: node changes "
                        "fill server slots and never reload (see [haproxy] spare_servers)")
        self.supervised = settings.supervised_by_systemd
        # The master pid last seen: under systemd, a new one means its unit restarted it.
        self._master_seen: int | None = None

    # ------------------------------------------------------------------ actions

    def restore(self) -> None:
        """At start-up: tighten the state dir, finish what a killed worker left, reconcile."""
        try:
            restrict_directory(self.files.root)
        except OSError as exc:
            LOG.warning("Cannot restrict the mode of %s: %s", self.files.root, exc)
        with self._exclusive():
            self._undo_interrupted_update()
            self._master_seen = self.process.master_pid()
            self.reconcile()
            if self.process.is_running():
                # An adopted sink may run the code of the release before an upgrade.
                self._ensure_sink()
        self.process.stand_by()

    def sync_live_config(self, lock_timeout: float) -> None:
        """Make the live file what state.json says, without touching HAProxy: for
        libra-haproxy.service before HAProxy starts (a first boot, a file torn by a power
        cut). A worker holding the lock longer than `lock_timeout` is changing the file
        itself; the file is then left as it is."""
        with self._exclusive(lock_timeout):
            self._undo_interrupted_update()

    def reconcile(self) -> None:
        """Repair any difference between the desired state and what runs."""
        with self._exclusive():
            if self.supervised:
                self._notice_unit_restart()
                return
            desired = self.store.load()
            running = self.process.is_running()
            repair = decide(desired.lifecycle, running, self.files.config.exists())
            if repair is Repair.NONE:
                if running and not self.logs.is_running():
                    # Without the sink, access lines (and the bytes METRICS bills) are lost.
                    LOG.warning("The log sink is not running: starting it again")
                    self._ensure_sink()
                return
            LOG.warning("Desired state %s but HAProxy is %s: %sing it", desired.lifecycle.value,
                        "running" if running else "not running", repair.value)
            if repair is Repair.STOP:
                self.process.stop()
                return
            try:
                self._start()
            except WorkerError as exc:
                self.store.save(replace(desired, last_error=f"HAProxy could not be restarted: {exc}"))
                raise
            self.store.save(replace(
                desired,
                restarts=desired.restarts + 1,
                last_error=f"HAProxy was not running at {utc_now()}; restarted it.",
            ))

    def restart(self) -> None:
        """The operator's restart: a hitless reload when running, a start when not."""
        with self._exclusive():
            if self._configured("restart").lifecycle is Lifecycle.SUSPENDED:
                raise WorkerError("Cannot restart: the load balancer is SUSPENDED (HAProxy "
                                  "stays stopped); send ENABLE to serve it again.")
            if self.process.is_running():
                self.process.reload()
            elif self.supervised:
                raise WorkerError("HAProxy is not running; its unit starts it: "
                                  "systemctl start libra-haproxy.")
            else:
                self._start()

    def update(self, device: Device) -> None:
        with self._exclusive():
            desired = self.store.load()
            previous = self._read_live_config()
            accepted = self.configured_device()
            self._check_new_ports_free(device)
            suspended = desired.lifecycle is Lifecycle.SUSPENDED
            running = not suspended and self.process.is_running()
            plan, reason = (self._runtime_plan(desired, accepted, previous, device)
                            if running else (None, ""))
            checked = plan is None or not self._template_is_shipped()
            with contextlib.ExitStack() as stack:
                # Started before the text exists: HAProxy's start-up overlaps the rendering.
                checker = (stack.enter_context(self.process.checker(self.files.candidate))
                           if checked else None)
                # A reload renders every node under its own id again, with new spares.
                layout = plan.layout if plan else slots.fresh(device, self.settings.spare_servers)
                text = self._render(device, layout)
                # Made and written while HAProxy checks the file, renamed into place once
                # HAProxy serves the change: the state file is the commit point.
                staged = stack.enter_context(self.store.staging(lambda: desired.moved_to(
                    Lifecycle.SUSPENDED if suspended else Lifecycle.ACTIVE,
                    loadbalancers=device_document(device)["loadbalancers"],
                    layout=slots.to_document(layout))))

                def while_checking() -> None:
                    staged.write()
                    # For the next UPDATE that needs a check: started now, its fork does
                    # not delay this reply.
                    self.process.stand_by()

                # Always: a later start or reload must come up exactly as this UPDATE says.
                # If the file is refused, the live one is untouched. Under systemd a
                # suspended device keeps serving its idle file; ENABLE renders this one.
                # Unchecked (a node-only change, see the module's docstring), the file is
                # replaced at once.
                if checker is None:
                    atomic_write(self.files.config, text, durable=False)
                elif suspended and self.supervised:
                    self._check(text, checker, meanwhile=while_checking)
                    self.files.candidate.unlink()
                else:
                    self._install(text, checker, meanwhile=while_checking)
                try:
                    if suspended:
                        LOG.info("Suspended: the new configuration is kept for ENABLE")
                    elif running:
                        self._ensure_sink()
                        self._apply_to_running(plan, reason, checked)
                    else:
                        self._start()
                    staged.commit()
                except BaseException as exc:
                    # Whatever failed (a refused reload, a full disk writing state.json,
                    # the job's alarm), HAProxy goes back to what state.json says it
                    # serves, so the reply's "left unchanged" holds and a restart brings
                    # up the same. Once state.json holds this UPDATE (the alarm landing in
                    # its directory's fsync), it is what HAProxy serves and must keep.
                    if not staged.in_place:
                        self._put_back(previous, hurry=isinstance(exc, ActionTimeout))
                    raise
            # What the state file now holds, already parsed.
            self._accepted = (staged.state, device, layout)
            self._rendered = (device, text)

    def suspend(self) -> None:
        """Also a PASS on a device never configured or deleted, as in Libra: nothing
        listens there, which is what SUSPEND asks; the state stays NEW or DELETED."""
        with self._exclusive():
            desired = self.store.load()
            if self.supervised:
                self._serve(self._render(IDLE_DEVICE, ()))
            else:
                self.process.stop()
            if desired.lifecycle is Lifecycle.ACTIVE:
                self._save(desired, Lifecycle.SUSPENDED)

    def enable(self) -> None:
        with self._exclusive():
            desired = self._configured("enable")
            if self.supervised:
                accepted = self.configured_device()
                if accepted is None:
                    raise WorkerError("Cannot enable: the saved load-balancer definition is "
                                      "no longer valid; send an UPDATE.")
                self._serve(self._render(accepted, self.configured_layout()))
            elif not self.process.is_running():
                self._start()
            if desired.lifecycle is not Lifecycle.ACTIVE:
                self._save(desired, Lifecycle.ACTIVE)

    def delete(self) -> None:
        with self._exclusive():
            desired = self.store.load()
            if self.supervised:
                # HAProxy and the sink stay up, idle: their units, not DELETE, decide their
                # life. The stored access lines go; the byte counters METRICS bills stay.
                self._serve(self._render(IDLE_DEVICE, ()))
                self.logs.store.discard_lines()
            else:
                self.process.stop()
                self.files.config.unlink(missing_ok=True)
                self.files.stats_socket.unlink(missing_ok=True)
                self.logs.remove_logs()
            for path in (self.files.candidate, self.files.rejected):
                path.unlink(missing_ok=True)
            if desired.lifecycle is not Lifecycle.DELETED:
                self._save(desired, Lifecycle.DELETED, loadbalancers=[], layout=None)

    def stats(self) -> DeviceStats:
        # Asked first, read last: HAProxy answers while the state and the layout are
        # looked at. When there is nothing to ask it about, the answer is never read.
        query = StatusQuery(self.files.stats_socket)
        try:
            # One look at the state file: the lifecycle, the load balancers and their slots
            # all from the same UPDATE.
            desired, accepted, layout = self._parsed_state()
            if desired.lifecycle is Lifecycle.DELETED:
                raise StatsUnavailable("The load balancer has been deleted.", status="DELETED")
            if desired.lifecycle is Lifecycle.NEW:
                raise StatsUnavailable("No load balancer is configured yet.", status="NEW")
            if self.supervised and desired.lifecycle is Lifecycle.SUSPENDED:
                raise StatsUnavailable("The load balancer is SUSPENDED: HAProxy serves none of "
                                       "its ports.", status=desired.lifecycle.value)
            # Only the nodes of the last UPDATE, by node id, whatever slot serves them: not
            # empty slots nor servers retired in maintenance. A TCP and a GALERA load
            # balancer share their backend's name: the UPDATE says which it is.
            wanted = {
                (render.PROXY_NAMES[lb.protocol], slot.name): (slot.node, lb.protocol.value)
                for lb, lb_slots in zip(accepted.loadbalancers if accepted else (), layout or ())
                for slot in lb_slots if slot.node is not None
            }
            # A node whose server HAProxy does not list is DOWN: in maintenance (a DISABLED
            # node), or not in the running configuration.
            up = {(server.backend, server.server): server.is_up
                  for server in self._statuses(query, desired.lifecycle)}
        finally:
            query.close()
        nodes = tuple(NodeStatus(node, "UP" if up.get(server, False) else "DOWN", protocol)
                      for server, (node, protocol) in wanted.items())
        return DeviceStats(
            state=desired.lifecycle.value,
            since=desired.since,
            nodes=nodes,
            restarts=desired.restarts,
            last_error=desired.last_error,
        )

    def _statuses(self, query: StatusQuery, lifecycle: Lifecycle) -> list[ServerStatus]:
        """The servers' statuses, or why there are none. A stats socket that answered is a
        running HAProxy, so the master is looked for only when it did not (it took a sixth
        of every STATS in the worker, measured: two file reads)."""
        try:
            return query.statuses()
        except StatsUnavailable:
            if not self.process.is_running_beside_reload():
                raise StatsUnavailable(f"HAProxy is not running (the load balancer is "
                                       f"{lifecycle.value}).", status=lifecycle.value) from None
            raise

    def metrics(self, job: str | None = None) -> MetricsPeriod:
        desired = self.store.load()
        if desired.lifecycle is Lifecycle.DELETED:
            raise WorkerError("The load balancer has been deleted.", status="DELETED")
        if desired.lifecycle is Lifecycle.NEW:
            raise WorkerError("No load balancer is configured yet.", status="NEW")
        # Counted by the log sink, so SUSPENDED or a crashed HAProxy still report.
        accepted = self.configured_device()
        configured = tuple(lb.protocol.mode for lb in accepted.loadbalancers) if accepted else ()
        return self.metrics_ledger.report(configured, job)

    def health(self) -> DeviceHealth:
        master = self.process.master_pid()
        try:
            free: int | None = shutil.disk_usage(self.files.root).free
        except OSError:
            free = None
        traffic = TrafficTotals.read(self.metrics_ledger.traffic_path)
        return DeviceHealth(
            state=self.store.load().lifecycle.value,
            haproxy_version=self.process.version(),
            haproxy_running=master is not None,
            haproxy_master_pid=master,
            haproxy_dropped_logs=dropped_logs(self.files.stats_socket) if master else None,
            state_dir_free_bytes=free,
            log_sink_running=self.logs.is_running(),
            log_sink_pid=self.logs.pid(),
            unreadable_access_lines=traffic.unreadable_lines if traffic else 0,
        )

    def archive(self, request: ArchiveRequest, job: str | None = None) -> dict[str, Any]:
        self.endpoint_policy.check(request.endpoint)  # before any connection is made
        return archive.archive_logs(
            self.logs.log_dir,
            protocol=request.protocol.mode,  # a GALERA load balancer's logs are its tcp ones
            lb_id=request.lb_id,
            basepath=request.basepath,
            endpoint=request.endpoint,
            token=request.token,
            timeout=self.settings.archive_timeout,
            job=job,
        )

    def configured_device(self) -> Device | None:
        """The definition of the last accepted UPDATE, re-validated from the state file."""
        return self._parsed_state()[1]

    def configured_layout(self) -> slots.Layout | None:
        """The server slots the live file renders for `configured_device`."""
        return self._parsed_state()[2]

    def _parsed_state(self) -> tuple[DesiredState, Device | None, slots.Layout | None]:
        desired = self.store.load()
        if self._accepted is None or self._accepted[0] is not desired:
            device = self._parse_accepted(desired)
            layout = None
            if device is not None:
                layout = slots.from_document(desired.layout, device)
                if layout is None:
                    if desired.layout is not None:
                        LOG.error("The saved server slots do not fit the saved load balancers: "
                                  "rendering them afresh")
                    # A state file of a release without slots: what a reload renders.
                    layout = slots.fresh(device, self.settings.spare_servers)
            self._accepted = (desired, device, layout)
        return self._accepted

    @staticmethod
    def _parse_accepted(desired: DesiredState) -> Device | None:
        if not desired.loadbalancers:
            return None
        try:
            return parse_device({"loadbalancers": desired.loadbalancers})
        except InvalidMessage as exc:
            LOG.error("The saved load-balancer definition is no longer valid: %s", exc)
            return None

    # ------------------------------------------------------------------ steps

    @contextlib.contextmanager
    def _exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """This thread alone, and this process alone, may change the device (re-entrant).

        With `timeout`, a WorkerError if another process holds it that long."""
        with self._lock:
            if self._lock_depth == 0:
                if self._lock_fd < 0:
                    # Opened once and kept: a state_dir that turns read-only later must
                    # not stop the reconciler from restarting HAProxy.
                    self._lock_fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
                _flock(self._lock_fd, self._lock_file, timeout)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _apply_to_running(self, plan: runtime.RuntimePlan | None, reason: str,
                          checked: bool) -> None:
        """Apply a node-only change through the Runtime API; reload for anything else.

        The new file is already installed; a reload is also the way back from a runtime
        change that HAProxy refused or that did not verify: the file renders the plan's
        slots, so the reloaded HAProxy serves the same servers under the same names.
        """
        if plan is not None:
            try:
                runtime.apply_plan(plan, self.files.stats_socket,
                                   timeout=self.settings.command_timeout)
            except runtime.RuntimeChangeFailed as exc:
                reason = f"the runtime change failed: {exc}"
            else:
                LOG.info("UPDATE applied at runtime, no reload: %s", plan.summary())
                return
        if not checked:
            self.process.check(self.files.config)
        self.process.reload()
        LOG.info("UPDATE reloaded HAProxy: %s", reason)

    def _runtime_plan(self, desired: DesiredState, accepted: Device | None,
                      previous: str | None,
                      device: Device) -> tuple[runtime.RuntimePlan | None, str]:
        """The runtime plan, or None and why the UPDATE needs a reload."""
        layout = self.configured_layout()
        if (desired.lifecycle is not Lifecycle.ACTIVE or accepted is None or layout is None
                or previous is None):
            return None, "there is no accepted configuration to change at runtime"
        # The running HAProxy serves the live file; a change to the template (or a hand
        # edit) since then would not be carried by node commands alone. The shipped
        # template changes only with the code, so its last rendering can be reused; an
        # operator's template may be edited at any time.
        if (self._rendered is not None and self._rendered[0] is accepted
                and self._template_is_shipped()):
            expected = self._rendered[1]
        else:
            expected = self._render(accepted, layout)
        if expected != previous:
            return None, "the live file differs from the last UPDATE's rendering"
        try:
            plan = runtime.plan_node_changes(accepted, device, layout, self._slot_check())
        except runtime.RuntimeChangeFailed as exc:
            return None, f"the server slots could not be read: {exc}"
        if isinstance(plan, str):
            return None, plan
        return plan, ""

    def _slot_check(self) -> runtime.Reusable:
        """`reusable` for the planner: asks the running HAProxy about each candidate slot
        (one `show stat` row each; the backends' numbers once)."""
        deadline = time.monotonic() + self.settings.command_timeout
        ids: dict[str, str] = {}

        def reusable(backend: str, position: int, slot: slots.Slot, node: Node) -> bool:
            if not ids:
                ids.update(runtime.backend_ids(self.files.stats_socket, deadline))
            if backend not in ids:
                raise runtime.RuntimeChangeFailed(f"HAProxy runs no backend {backend}")
            row = runtime.read_slot(self.files.stats_socket, deadline, ids[backend], position)
            return runtime.slot_reusable(row, slot, node)

        return reusable

    def _render(self, device: Device, layout: slots.Layout) -> str:
        paths = render.RuntimePaths(self.files.stats_socket, self.logs.socket_path)
        context = render.build_context(
            device,
            listen_address=self.settings.bind_address,
            paths=paths,
            maxconn=self.settings.maxconn,
            persistence=self.persistence,
            layout=layout,
        )
        return render.render(self.templates, context)

    def _template_is_shipped(self) -> bool:
        template_dir = self.settings.template_dir
        return template_dir is None or not (template_dir / render.TEMPLATE_NAME).exists()

    def _install(self, text: str, checker: ConfigChecker | None = None,
                 meanwhile: Callable[[], object] | None = None) -> None:
        """Write the candidate, prove it with `haproxy -c` (see `_check`), then swap it in
        atomically.

        Not fsynced: the state file, saved next in the same directory, is the commit point
        (its directory fsync makes this rename durable too), and at start-up
        `_undo_interrupted_update` re-renders the live file from it whenever they differ,
        a file torn by a power cut included.
        """
        self._check(text, checker, meanwhile)
        os.replace(self.files.candidate, self.files.config)

    def _check(self, text: str, checker: ConfigChecker | None = None,
               meanwhile: Callable[[], object] | None = None) -> None:
        """Write the candidate and prove it with `haproxy -c`: `checker`, started earlier
        for it (process.checker), or one started now; `meanwhile` runs while HAProxy checks.
        The candidate is left for the caller to swap in (or remove). A refused one is kept
        for the operator to read.

        HAProxy reads the text from a pipe, so the candidate file is written while it
        checks (100 KB at 1,000 nodes).
        """
        def alongside() -> None:
            atomic_write(self.files.candidate, text, durable=False)
            if meanwhile is not None:
                meanwhile()

        with contextlib.ExitStack() as stack:
            if checker is None:
                checker = stack.enter_context(self.process.checker(self.files.candidate))
            try:
                checker.check(text, alongside)
            except ConfigCheckFailed:
                os.replace(self.files.candidate, self.files.rejected)
                raise
            except BaseException:
                self.files.candidate.unlink(missing_ok=True)
                raise

    def _check_new_ports_free(self, device: Device) -> None:
        """Refuse a port HAProxy cannot listen on (held by another program, privileged,
        an address this host does not have) before reloading onto it.

        A reload that cannot bind makes HAProxy pause the running listeners for about two
        seconds while it retries, so this is checked first. Ports HAProxy already serves
        cannot be test-bound, and need not be.
        """
        serving = (self.store.load().lifecycle is Lifecycle.ACTIVE
                   and self.process.is_running())
        current = self.configured_device() if serving else None
        ports = {lb.port for lb in current.loadbalancers} if current else set()
        for lb in device.loadbalancers:
            problem = None if lb.port in ports else bind_problem(self.settings.bind_address, lb.port)
            if problem:
                raise WorkerError(f"{problem}; the load balancer was left unchanged.")
        self._check_peers_address_free(device, current)

    def _check_peers_address_free(self, device: Device, current: Device | None) -> None:
        """The peers listener of TCP source persistence: no load balancer may take its
        port, and it must be free when the first TCP load balancer brings it."""
        if not self.persistence.tcp_source:
            return
        host, port = self.settings.peers_address
        listen = ipaddress.ip_address(self.settings.bind_address)
        if listen.is_unspecified or listen == ipaddress.ip_address(host):
            for lb in device.loadbalancers:
                if lb.port == port:
                    raise WorkerError(f"Port {port} is taken by [haproxy] peers_address on this "
                                      "device; the load balancer was left unchanged.")
        listening = current is not None and render.transform_peers(current, self.persistence)
        if listening or not render.transform_peers(device, self.persistence):
            return
        problem = bind_problem(host, port)
        if problem:
            raise WorkerError(f"[haproxy] peers_address: {problem}; the load balancer was left "
                              "unchanged.")

    def _put_back(self, previous: str | None, hurry: bool = False) -> None:
        """After a failed reload or start: the live file goes back to what HAProxy serves.

        `hurry`: the job's time is up, so the reload of the previous file is requested and
        not waited for (nor retried); the job ends at once.
        """
        if previous is None:
            self.files.config.unlink(missing_ok=True)
            return
        atomic_write(self.files.config, previous)
        if self.process.is_running():
            try:
                # The master is left in its failed-reload state; reloading the old file
                # gives it a clean worker generation again.
                if hurry:
                    self.process.request_reload()
                else:
                    self.process.reload()
            except (WorkerError, OSError) as exc:
                LOG.error("Reloading the previous configuration failed too: %s", exc)

    def _start(self) -> None:
        if not self.files.config.exists():
            raise WorkerError("There is no configuration to start HAProxy with; send an UPDATE.")
        if self.supervised:
            # Its unit restarts a dead HAProxy within seconds, on the file as it is then.
            self.process.wait_for_master()
            self.process.reload()
            return
        self.logs.ensure_running()
        self.process.start()

    def _ensure_sink(self) -> None:
        """Under systemd the sink is libra-logsink.service's, socket-activated."""
        if not self.supervised:
            self.logs.ensure_running()

    def _serve(self, text: str) -> None:
        """Under systemd: install `text` (checked) and bring the running HAProxy to it; on
        any failure the previous file is put back and keeps serving."""
        previous = self._read_live_config()
        self._install(text)
        try:
            if self.process.is_running():
                self.process.reload()
            else:
                self._start()
        except BaseException as exc:
            self._put_back(previous, hurry=isinstance(exc, ActionTimeout))
            raise

    def _notice_unit_restart(self) -> None:
        """Under systemd: a new master pid means libra-haproxy.service restarted HAProxy
        (on the live file): runtime-only state is gone, and STATS says it happened."""
        master = self.process.master_pid()
        if master is None or master == self._master_seen:
            return
        if self._master_seen is not None:
            LOG.warning("HAProxy's master is now pid %d (was %d): its unit restarted it",
                        master, self._master_seen)
            desired = self.store.load()
            self.store.save(replace(
                desired, restarts=desired.restarts + 1,
                last_error=f"HAProxy was restarted by libra-haproxy.service at {utc_now()}."))
        self._master_seen = master

    def _undo_interrupted_update(self) -> None:
        """Put back the configuration of the last accepted UPDATE if a killed worker left
        another one live (it died between swapping the file and recording the UPDATE).
        Under systemd also the file a SUSPEND, ENABLE or DELETE left half-done, or none."""
        self.store.remove_leftovers()
        expected = self._expected_live_text(self.store.load())
        live = self._read_live_config()
        if expected is None or live == expected or (live is None and not self.supervised):
            return
        LOG.warning("The live configuration is not the last accepted UPDATE's: putting it back")
        self._install(expected)
        if self.process.is_running():
            self.process.reload()

    def _expected_live_text(self, desired: DesiredState) -> str | None:
        """The live file the desired state asks for; None where the worker keeps none."""
        accepted = self.configured_device()
        layout = self.configured_layout()
        if not self.supervised:
            return None if accepted is None or layout is None else self._render(accepted, layout)
        if desired.lifecycle is Lifecycle.ACTIVE and accepted is not None and layout is not None:
            return self._render(accepted, layout)
        return self._render(IDLE_DEVICE, ())

    def _configured(self, action: str) -> DesiredState:
        desired = self.store.load()
        if desired.lifecycle is Lifecycle.DELETED:
            raise WorkerError(f"Cannot {action}: the load balancer has been deleted.")
        if desired.lifecycle is Lifecycle.NEW or not self.files.config.exists():
            raise WorkerError(f"Cannot {action}: no load balancer is configured; send an UPDATE.")
        return desired

    def _read_live_config(self) -> str | None:
        try:
            return self.files.config.read_text("utf-8")
        except FileNotFoundError:
            return None

    def _save(self, desired: DesiredState, lifecycle: Lifecycle, **changes: Any) -> DesiredState:
        saved = desired.moved_to(lifecycle, **changes)
        self.store.save(saved)
        return saved


def _flock(descriptor: int, path: Path, timeout: float | None) -> None:
    if timeout is None:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise WorkerError(f"{path} stayed locked for {timeout:g} s: the worker is "
                                  "changing the configuration.") from None
            time.sleep(0.05)
