"""Apply an UPDATE that only changes nodes through HAProxy's Runtime API, without a reload.

Three small parts, in the order the driver uses them:

* `plan_node_changes(old, new)` is pure: it diffs the last accepted `Device` against the
  new one and returns the stats-socket commands that turn one into the other, or None
  when anything but nodes differs (the caller reloads then).
* `apply_plan(plan, stats_socket)` sends those commands, each answer checked against the
  exact text HAProxy 2.6 gives on success, deletes removed servers once they are drained,
  then verifies the servers it touched against the desired ones. Only those: the cost of
  a change follows its size, not the size of the backend (a 10,000-server `show stat`
  alone is megabytes of CSV).
* `parse_servers_state`, `running_servers` and `mismatches` read and compare that state;
  they are pure too, so the verification is unit-tested without HAProxy.

What the Runtime API does not express is left to the reload, on purpose:

* a node whose address, port or backup flag changed (same id). HAProxy has no command
  for the backup flag, and `set server addr` would move a server that is already UP to
  an address nobody has checked. Re-creating it under the same name means deleting it
  first, which takes it out of rotation until its connections drain: for a sole node
  that is a window of 503s, where a reload has none.
* any difference beyond the node lists: protocols, ports, algorithm, monitor, options,
  ids or names, and the order of the load balancers.

New servers are added with the same option words as their configuration line (dynamic
servers inherit nothing from `default-server`), and their health checks are enabled
before they leave maintenance; enabled the other way round they would run unchecked.
Measured on 2.6.12: such a server is UP at once and goes DOWN at its first failed check,
exactly like a server of a freshly loaded file, so a reload would serve it no sooner.
An HTTP backend with cookie persistence derives each server's cookie from its key and
the server's address:port (`cookie ... dynamic`), but 2.6 computes none for a server
added at runtime (measured on 2.6.12: its clients were told to delete their cookie), so
`enable dynamic-cookie backend` computes the cookies of all its servers again, the new
ones included, before any of them leaves maintenance. It leaves the others' values as
they were (same key, same addresses) and puts no key on the socket.
Removed servers go to maintenance first, so no new request reaches them, then `del
server` is tried once. A server still holding connections cannot be deleted yet: with
keep-alive clients, HAProxy keeps a server-side connection attached to each client
session, so that can last as long as the clients stay. Waiting for them would hold the
UPDATE for that long, `shutdown sessions` would cut requests in flight, and a reload would
give up the whole runtime path. So such a server is *retired*: it stays in maintenance,
takes no traffic, is not reported by STATS, and the caller deletes it later
(`delete_retired`); the next reload drops it anyway.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Container, Iterable, Mapping

from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.sockets import parse_stat_csv, send_command
from libra_worker.messages import Device, LoadBalancer, Node

# HAProxy 2.6's whole answer (whitespace stripped) to each command that succeeded.
ADDED = "New server registered."
DELETED = "Server deleted."
DONE = ""
STILL_CONNECTED = "Server still has connections attached to it, cannot remove it."
NO_SUCH_SERVER = "No such server."  # gone already, e.g. a reload came in between

# `show servers state` flags (HAProxy's include/haproxy/server-t.h and check-t.h).
ADMIN_ANY_MAINT = 0x23  # forced, inherited (track) or DNS-resolution maintenance
ADMIN_ANY_DRAIN = 0x18  # forced or inherited drain
CHECK_CONFIGURED = 0x02
CHECK_ENABLED = 0x04

class RuntimeChangeFailed(Exception):
    """The Runtime API refused a command, or the result differs from the plan.

    It never leaves the driver: it means "reload instead", and its message says why.
    """


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Command:
    """One stats-socket command and the answer HAProxy gives when it succeeded."""

    text: str
    expect: str = DONE


@dataclass(frozen=True)
class DesiredServer:
    """What one server must look like once the plan is applied."""

    backend: str
    name: str
    address: str
    port: int
    weight: int
    backup: bool
    enabled: bool


@dataclass(frozen=True)
class RuntimePlan:
    """The commands for one node-only change, and the servers to expect afterwards.

    `commands` add new servers, change kept ones and put removed ones in maintenance,
    in that order, so capacity is added before any is taken away. `removals` are the
    servers ("backend/name") to delete once drained. `desired` covers the servers the
    plan adds or changes; with `removals` they are all the servers verification reads.
    """

    commands: tuple[Command, ...]
    removals: tuple[str, ...]
    desired: tuple[DesiredServer, ...]
    backends: tuple[str, ...]
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"{len(self.added)} node(s) added, {len(self.removals)} removed, "
                f"{len(self.changed)} changed")


def plan_node_changes(old: Device, new: Device,
                      retired: Mapping[str, Node] | None = None, *,
                      persistence: render.Persistence = render.NO_PERSISTENCE,
                      ) -> RuntimePlan | None:
    """The Runtime API commands that turn `old` into `new`, or None if it takes a reload.

    `retired` are servers ("backend/name") an earlier plan removed that still sit in
    maintenance: a node coming back under such a name is brought back to service rather
    than added (HAProxy refuses a second server of that name). `persistence` is what the
    file is rendered with: servers added to a cookie backend get their cookies computed.
    """
    retired = retired or {}
    if len(old.loadbalancers) != len(new.loadbalancers):
        return None
    commands: list[Command] = []
    removals: list[str] = []
    desired: list[DesiredServer] = []
    added: list[str] = []
    changed: list[str] = []
    for before, after in zip(old.loadbalancers, new.loadbalancers):
        if _without_nodes(before) != _without_nodes(after):
            return None
        backend = render.PROXY_NAMES[after.protocol]
        previous = {node.id: node for node in before.nodes}
        current = {node.id for node in after.nodes}
        new_nodes = [node for node in after.nodes if node.id not in previous]
        modified = [(previous[node.id], node) for node in after.nodes
                if node.id in previous and previous[node.id] != node]
        if any(_identity(old_node) != _identity(node) for old_node, node in modified):
            return None
        gone = [f"{backend}/{node.id}" for node in before.nodes if node.id not in current]
        additions: list[Command] = []
        activations: list[Command] = []
        for node in new_nodes:
            waiting = retired.get(f"{backend}/{node.id}")
            if waiting is None:
                additions.append(_add_server(backend, node, after))
                activations += _activate_server(backend, node)
            elif _identity(waiting) == _identity(node):
                # Retired means in maintenance, with its old weight, checks and cookie.
                activations += _change_server(backend, replace(waiting, enabled=False), node)
            else:
                return None
        if additions and persistence.uses_cookie(after):
            # Once for all the new servers: it walks every server of the backend.
            additions.append(Command(f"enable dynamic-cookie backend {backend}"))
        commands += additions + activations
        for old_node, node in modified:
            commands += _change_server(backend, old_node, node)
        commands += [Command(f"set server {server} state maint") for server in gone]
        added += [f"{backend}/{node.id}" for node in new_nodes]
        changed += [f"{backend}/{node.id}" for _, node in modified]
        removals += gone
        desired += [_desired_server(backend, node)
                    for node in [*new_nodes, *(node for _, node in modified)]]
    backends = tuple(render.PROXY_NAMES[lb.protocol] for lb in new.loadbalancers)
    return RuntimePlan(tuple(commands), tuple(removals), tuple(desired), backends,
                       tuple(added), tuple(changed))


def _without_nodes(lb: LoadBalancer) -> LoadBalancer:
    return replace(lb, nodes=())


def _identity(node: Node) -> tuple[str, int, bool]:
    """What a server cannot change at runtime without being re-created."""
    return node.address, node.port, node.backup


def _add_server(backend: str, node: Node, lb: LoadBalancer) -> Command:
    # The option words of the configuration line, `disabled` included: HAProxy 2.6
    # accepts it, and the new server then stays in maintenance like the file's.
    address = render.host_port(node.address, node.port)
    return Command(f"add server {backend}/{node.id} {address} {render.server_options(node, lb)}",
                   ADDED)


def _activate_server(backend: str, node: Node) -> list[Command]:
    """An added server's checks, then (unless disabled) the server: a server enabled
    before its checks would run unchecked."""
    server = f"{backend}/{node.id}"
    commands = [Command(f"enable health {server}")]
    if node.enabled:
        commands.append(Command(f"enable server {server}"))
    return commands


def _change_server(backend: str, before: Node, after: Node) -> list[Command]:
    server = f"{backend}/{after.id}"
    commands = []
    if before.weight != after.weight:
        commands.append(Command(f"set server {server} weight {after.weight}"))
    if before.enabled != after.enabled:
        state = "ready" if after.enabled else "maint"
        commands.append(Command(f"set server {server} state {state}"))
    return commands


def _desired_server(backend: str, node: Node) -> DesiredServer:
    return DesiredServer(backend, node.id, node.address, node.port, node.weight, node.backup,
                         node.enabled)


# --------------------------------------------------------------------------- applying


def apply_plan(plan: RuntimePlan, stats_socket: Path, *, timeout: float) -> tuple[str, ...]:
    """Send the plan's commands, delete removed servers, then prove the result.

    Args:
        plan: from `plan_node_changes`.
        stats_socket: HAProxy's admin-level stats socket.
        timeout: for the whole of it, commands and verification together.

    Returns:
        The removed servers ("backend/name") still holding connections: retired, in
        maintenance, for `delete_retired` to delete later.

    Raises:
        RuntimeChangeFailed: a command was refused, time ran out, or the running servers
            differ from `plan.desired`. Part of the plan may have been applied: the caller
            reloads.
    """
    deadline = time.monotonic() + timeout
    for command in plan.commands:
        _run(stats_socket, command, deadline)
    retired = delete_retired(plan.removals, stats_socket, deadline)
    touched = {(server.backend, server.name) for server in plan.desired}
    touched |= {_backend_and_name(server) for server in plan.removals}
    if not touched:
        return retired
    problems = mismatches(plan.desired, read_running_servers(stats_socket, deadline, touched),
                          plan.backends)
    if problems:
        raise RuntimeChangeFailed("the running servers differ from the UPDATE: " + "; ".join(problems))
    return retired


def _run(stats_socket: Path, command: Command, deadline: float) -> None:
    answer = _send(stats_socket, command.text, deadline).strip()
    if answer != command.expect:
        raise RuntimeChangeFailed(f"HAProxy answered {answer[:200]!r} to {command.text!r}")


def delete_retired(servers: Iterable[str], stats_socket: Path, deadline: float) -> tuple[str, ...]:
    """Try `del server` once for each server (in maintenance); the ones still connected."""
    still_connected = []
    for server in servers:
        command = f"del server {server}"
        answer = _send(stats_socket, command, deadline).strip()
        if answer == STILL_CONNECTED:
            still_connected.append(server)
        elif answer not in (DELETED, NO_SUCH_SERVER):
            raise RuntimeChangeFailed(f"HAProxy answered {answer[:200]!r} to {command!r}")
    return tuple(still_connected)


def _send(stats_socket: Path, text: str, deadline: float) -> str:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RuntimeChangeFailed(f"time ran out before {text!r}")
    try:
        return send_command(stats_socket, text, remaining)
    except OSError as exc:
        raise RuntimeChangeFailed(f"the stats socket failed during {text!r}: {exc}") from None


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class RunningServer:
    """One server as the running HAProxy reports it."""

    backend: str
    name: str
    address: str
    port: int
    weight: int
    admin_state: int
    check_state: int
    backup: bool

    @property
    def enabled(self) -> bool:
        return not self.admin_state & (ADMIN_ANY_MAINT | ADMIN_ANY_DRAIN)

    @property
    def disabled(self) -> bool:
        return bool(self.admin_state & ADMIN_ANY_MAINT)

    @property
    def checked(self) -> bool:
        wanted = CHECK_CONFIGURED | CHECK_ENABLED
        return self.check_state & wanted == wanted


# Up to this many servers of a backend, each one's `show stat` line is asked for by id;
# beyond, one whole `show stat` of the backend costs less than that many round trips.
_STAT_BY_ID_MAX = 8


def _backend_and_name(server: str) -> tuple[str, str]:
    backend, _, name = server.partition("/")
    return backend, name


def read_running_servers(stats_socket: Path, deadline: float,
                         servers: Collection[tuple[str, str]] | None = None) -> list[RunningServer]:
    """The given servers (backend, name) as they run, from `show servers state` and
    `show stat` of their backends only; servers that do not exist are left out. Without
    `servers`, every server of every backend.

    Raises:
        RuntimeChangeFailed: the socket failed or answered something else.
    """
    if servers is None:
        state = _send(stats_socket, "show servers state", deadline)
        stat = _send(stats_socket, "show stat", deadline)
        try:
            return running_servers(parse_servers_state(state), parse_stat_csv(stat))
        except ValueError as exc:
            raise RuntimeChangeFailed(str(exc)) from None
    found = []
    try:
        for backend in sorted({backend for backend, _ in servers}):
            names = {name for server_backend, name in servers if server_backend == backend}
            state = parse_servers_state(
                _send(stats_socket, f"show servers state {backend}", deadline), names)
            # By number: the frontend of the same name would answer to the name.
            if len(state) > _STAT_BY_ID_MAX:
                stat = parse_stat_csv(_send(
                    stats_socket, f"show stat {state[0]['be_id']} 4 -1", deadline))
            else:
                stat = [row for server in state for row in parse_stat_csv(_send(
                    stats_socket, f"show stat {server['be_id']} 4 {server['srv_id']}", deadline))]
            found += running_servers(state, stat)
    except KeyError as exc:
        raise RuntimeChangeFailed(f"'show servers state' lacks a field: {exc}") from None
    except ValueError as exc:
        raise RuntimeChangeFailed(str(exc)) from None
    return found


def parse_servers_state(answer: str, names: Container[str] | None = None) -> list[dict[str, str]]:
    """The rows of a `show servers state` answer (format version 1), keyed by its header;
    with `names`, only the rows of those servers.

    Raises:
        ValueError: the answer is not that format.
    """
    lines = answer.strip().splitlines()
    if len(lines) < 2 or lines[0].strip() != "1" or not lines[1].startswith("# "):
        raise ValueError(f"unexpected answer to 'show servers state': {answer[:200]!r}")
    header = lines[1][2:].split()
    if names is not None and "srv_name" not in header:
        raise ValueError(f"'show servers state' has no srv_name column: {lines[1][:200]!r}")
    name_at = header.index("srv_name") if names is not None else 0
    rows = []
    for line in lines[2:]:
        values = line.split()
        if len(values) != len(header):
            raise ValueError(f"unexpected 'show servers state' line: {line[:200]!r}")
        if names is None or values[name_at] in names:
            rows.append(dict(zip(header, values)))
    return rows


def running_servers(state_rows: Iterable[Mapping[str, str]],
                    stat_rows: Iterable[Mapping[str, str]]) -> list[RunningServer]:
    """Join both answers by (backend, server): the backup flag is only in `show stat`.

    Raises:
        ValueError: a field is missing or not a number, or a server is in one answer only.
    """
    backup = {
        (row["pxname"], row["svname"]): row.get("bck") == "1"
        for row in stat_rows
        if row.get("svname") not in (None, "FRONTEND", "BACKEND")
    }
    servers = []
    try:
        for row in state_rows:
            key = (row["be_name"], row["srv_name"])
            if key not in backup:
                raise ValueError(f"{key[0]}/{key[1]} is missing from 'show stat'")
            servers.append(RunningServer(
                backend=key[0],
                name=key[1],
                address=row["srv_addr"],
                port=int(row["srv_port"]),
                weight=int(row["srv_uweight"]),
                admin_state=int(row["srv_admin_state"]),
                check_state=int(row["srv_check_state"]),
                backup=backup[key],
            ))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"'show servers state' lacks a field: {exc}") from None
    return servers


def mismatches(desired: Iterable[DesiredServer], running: Iterable[RunningServer],
               backends: Iterable[str]) -> list[str]:
    """Every way `running` differs from `desired` in `backends`, in words; [] when equal."""
    selected = set(backends)
    wanted = {(server.backend, server.name): server for server in desired}
    actual = {(server.backend, server.name): server for server in running
              if server.backend in selected}
    problems = [f"{backend}/{name} is not running" for backend, name in wanted
                if (backend, name) not in actual]
    # A server the UPDATE removed may stay, retired in maintenance, until it is deleted.
    problems += [f"{backend}/{name} should not be running" for backend, name in actual
                 if (backend, name) not in wanted and not actual[backend, name].disabled]
    for key in wanted.keys() & actual.keys():
        problems += _server_differences(wanted[key], actual[key])
    return sorted(problems)


def _server_differences(want: DesiredServer, have: RunningServer) -> list[str]:
    server = f"{want.backend}/{want.name}"
    problems = []
    if not _same_address(want.address, have.address) or want.port != have.port:
        problems.append(f"{server} is at {have.address} port {have.port}, "
                        f"not {want.address} port {want.port}")
    if want.weight != have.weight:
        problems.append(f"{server} has weight {have.weight}, not {want.weight}")
    if want.backup != have.backup:
        problems.append(f"{server} is {'' if have.backup else 'not '}a backup server")
    if want.enabled and not have.enabled:
        problems.append(f"{server} is in maintenance or draining (admin state {have.admin_state:#x})")
    if not want.enabled and not have.disabled:
        problems.append(f"{server} should be in maintenance (admin state {have.admin_state:#x})")
    if not have.checked:
        problems.append(f"{server} has no health check (check state {have.check_state:#x})")
    return problems


def _same_address(first: str, second: str) -> bool:
    if first == second:
        return True
    try:
        return ipaddress.ip_address(first) == ipaddress.ip_address(second)
    except ValueError:
        return False
