"""Apply an UPDATE that only changes nodes through HAProxy's Runtime API, without a reload.

Three small parts, in the order the driver uses them:

* `plan_node_changes(old, new, layout, reusable)` is pure: it diffs the last accepted
  `Device` against the new one over the server slots of the live file (slots.py) and
  returns the stats-socket commands that turn one into the other with the layout the
  new file renders, or why it takes a reload: anything but nodes differs, or a backend
  has no free slot of the kind a node needs (the reload then renders new spares).
* `apply_plan(plan, stats_socket)` sends those commands, each answer checked against the
  exact text HAProxy 2.6 gives on success, then verifies the servers it touched against
  the desired ones. Only those: the cost of a change follows its size, not the size of
  the backend (a 10,000-server `show stat` alone is megabytes of CSV).
* `parse_servers_state`, `running_servers` and `mismatches` read and compare that state;
  they are pure too, so the verification is unit-tested without HAProxy.

Every server is a line of the file, so HAProxy reuses server-side connections to all of
them (it never does to a server made with `add server`, measured on 2.6.12). A node:

* added fills a free slot of its kind: `set server <b>/<slot> addr <ip> port <port>`,
  its weight, its health check enabled, then `state ready` (a disabled node stays in
  maintenance). The check settings are the slot line's (the backend's monitor), which
  `set server addr` leaves alone; measured on 2.6.12, the server is UP at once when it
  leaves maintenance and goes DOWN at its `fall`-th failed check, exactly like a server
  of a freshly loaded file. With cookie persistence (`cookie ... dynamic`) HAProxy
  derives the slot's cookie again from the key and the new address:port at `set server
  addr`, so the node has the same cookie in the slot as under its own name after the
  next reload (measured on 2.6.12).
* whose weight or condition changed is changed in place.
* whose address, port or backup flag changed (same id) moves to a free slot of the
  right kind: the new slot is enabled before the old one goes to maintenance.
* removed goes to maintenance: no new request reaches it and connections in flight
  finish. A `slot:<n>` server is free for another node only once drained (no session and
  no idle, safe or used server connection in `show stat`; HAProxy 2.6 also closes a
  server's idle connections when it enters maintenance), or for a node at the very
  address and port it still holds connections to: the driver's `reusable` answers
  that. Keep-alive clients keep a server-side connection attached to their session
  for as long as they stay, so a slot may stay held long after its node left. A
  server named by the node's id stays the node's, retired in maintenance until the
  next reload; the node coming back (same kind) gets it again.

Commands come in that order: slots filled, servers changed, servers put in maintenance,
so capacity is added before any is taken away. What the Runtime API does not express is
left to the reload: protocols, ports, algorithm, monitor, options, ids or names, and the
order of the load balancers.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Container, Iterable, Mapping

from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.slots import Layout, Slot
from libra_worker.drivers.haproxy.sockets import parse_stat_csv, send_command
from libra_worker.messages import Device, LoadBalancer, Node

# HAProxy 2.6's whole answer (whitespace stripped) to each command that succeeded, or
# for `set server ... addr`, which says what changed, how it ends.
DONE = ""
ADDRESS_SET = "by 'stats socket command'"

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
    """One stats-socket command and the answer HAProxy gives when it succeeded (with
    `ending`, how that answer ends)."""

    text: str
    expect: str = DONE
    ending: bool = False

    def accepts(self, answer: str) -> bool:
        return answer.endswith(self.expect) if self.ending else answer == self.expect


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

    `removals` are the servers ("backend/name") the plan puts in maintenance (removed
    nodes, and the old servers of moved ones). `desired` covers the servers the plan
    fills or changes; with `removals` they are all the servers verification reads.
    `layout` is the slot layout the new file renders.
    """

    commands: tuple[Command, ...]
    removals: tuple[str, ...]
    desired: tuple[DesiredServer, ...]
    backends: tuple[str, ...]
    layout: Layout
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    moved: tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"{len(self.added)} node(s) added, {len(self.removals) - len(self.moved)} "
                f"removed, {len(self.changed)} changed, {len(self.moved)} moved")


# Whether a free slot (at this position of this backend) may take this node now: its
# server drained, or still at this node's own address and port (see `slot_reusable`).
Reusable = Callable[[str, int, Slot, Node], bool]


def plan_node_changes(old: Device, new: Device, layout: Layout,
                      reusable: Reusable) -> RuntimePlan | str:
    """The Runtime API commands that turn `old` (served with `layout`) into `new`, or
    why it takes a reload."""
    if len(old.loadbalancers) != len(new.loadbalancers) or len(layout) != len(new.loadbalancers):
        return "the change is more than nodes added, removed or changed"
    commands: list[Command] = []
    removals: list[str] = []
    desired: list[DesiredServer] = []
    added: list[str] = []
    changed: list[str] = []
    moved: list[str] = []
    new_layout = []
    for before, after, current in zip(old.loadbalancers, new.loadbalancers, layout):
        if _without_nodes(before) != _without_nodes(after):
            return "the change is more than nodes added, removed or changed"
        backend = render.PROXY_NAMES[after.protocol]
        slots = list(current)
        where = {slot.node: position for position, slot in enumerate(slots) if slot.node}
        previous = {node.id: node for node in before.nodes}
        free = _FreeSlots(backend, slots, reusable)
        fills: list[Command] = []
        changes: list[Command] = []
        emptied: list[int] = []  # still serving until the end of this plan: not free
        for node in after.nodes:
            old_node = previous.get(node.id)
            if old_node is node:
                # Most of a node-only change: messages hands back the Node of the last
                # parse for a node sent again unchanged, so no field is compared.
                continue
            if old_node is not None and _identity(old_node) == _identity(node):
                if old_node != node:
                    server = f"{backend}/{slots[where[node.id]].name}"
                    changes += _change_server(server, old_node, node)
                    changed.append(server)
                    desired.append(_desired_server(server, node))
                continue
            position = free.take(node)
            if position is None:
                kind = "backup " if node.backup else ""
                return f"{backend} has no free {kind}server slot left"
            slots[position] = slots[position]._replace(node=node.id)
            server = f"{backend}/{slots[position].name}"
            fills += _fill_slot(server, node)
            desired.append(_desired_server(server, node))
            if old_node is None:
                added.append(server)
            else:
                moved.append(server)
                emptied.append(where[node.id])
        current_ids = {node.id for node in after.nodes}
        emptied += [where[node.id] for node in before.nodes if node.id not in current_ids]
        for position in emptied:
            server = f"{backend}/{slots[position].name}"
            changes.append(Command(f"set server {server} state maint"))
            removals.append(server)
            slots[position] = slots[position]._replace(node=None)
        commands += fills + changes
        new_layout.append(tuple(slots))
    backends = tuple(render.PROXY_NAMES[lb.protocol] for lb in new.loadbalancers)
    return RuntimePlan(tuple(commands), tuple(removals), tuple(desired), backends,
                       tuple(new_layout), tuple(added), tuple(changed), tuple(moved))


class _FreeSlots:
    """The slots of one backend free when the plan starts, handed out in order: a
    node's own retired server first, else the first spare of its kind that `reusable`
    accepts. Slots the plan empties are not among them: they serve until it ends."""

    def __init__(self, backend: str, slots: list[Slot], reusable: Reusable) -> None:
        self.backend = backend
        self.slots = slots
        self.reusable = reusable
        self.own = {slot.name: position for position, slot in enumerate(slots)
                    if slot.node is None and not slot.spare}
        self.spares = {kind: [position for position, slot in enumerate(slots)
                              if slot.node is None and slot.spare and slot.backup == kind]
                       for kind in (False, True)}
        self.next = {False: 0, True: 0}

    def take(self, node: Node) -> int | None:
        own = self.own.pop(node.id, None)
        if own is not None and self._fits(own, node):
            return own
        spares = self.spares[node.backup]
        while self.next[node.backup] < len(spares):
            position = spares[self.next[node.backup]]
            self.next[node.backup] += 1  # taken now, or held by connections: not again
            if self._fits(position, node):
                return position
        return None

    def _fits(self, position: int, node: Node) -> bool:
        slot = self.slots[position]
        return slot.backup == node.backup and self.reusable(self.backend, position, slot, node)


def _without_nodes(lb: LoadBalancer) -> LoadBalancer:
    return replace(lb, nodes=())


def _identity(node: Node) -> tuple[str, int, bool]:
    """What moves a node to another slot: the address and kind of a server line."""
    return node.address, node.port, node.backup


def _fill_slot(server: str, node: Node) -> list[Command]:
    """Address, weight, checks, then (unless disabled) the server: a server enabled
    before its checks would run unchecked."""
    commands = [
        Command(f"set server {server} addr {node.address} port {node.port}", ADDRESS_SET,
                ending=True),
        Command(f"set server {server} weight {node.weight}"),
        Command(f"enable health {server}"),
    ]
    if node.enabled:
        commands.append(Command(f"set server {server} state ready"))
    return commands


def _change_server(server: str, before: Node, after: Node) -> list[Command]:
    commands = []
    if before.weight != after.weight:
        commands.append(Command(f"set server {server} weight {after.weight}"))
    if before.enabled != after.enabled:
        state = "ready" if after.enabled else "maint"
        commands.append(Command(f"set server {server} state {state}"))
    return commands


def _desired_server(server: str, node: Node) -> DesiredServer:
    backend, name = _backend_and_name(server)
    return DesiredServer(backend, name, node.address, node.port, node.weight, node.backup,
                         node.enabled)


# --------------------------------------------------------------------------- applying


def apply_plan(plan: RuntimePlan, stats_socket: Path, *, timeout: float) -> None:
    """Send the plan's commands, then prove the result.

    Args:
        plan: from `plan_node_changes`.
        stats_socket: HAProxy's admin-level stats socket.
        timeout: for the whole of it, commands and verification together.

    Raises:
        RuntimeChangeFailed: a command was refused, time ran out, or the running servers
            differ from `plan.desired`. Part of the plan may have been applied: the caller
            reloads.
    """
    deadline = time.monotonic() + timeout
    for command in plan.commands:
        _run(stats_socket, command, deadline)
    touched = {(server.backend, server.name) for server in plan.desired}
    touched |= {_backend_and_name(server) for server in plan.removals}
    if not touched:
        return
    problems = mismatches(plan.desired, read_running_servers(stats_socket, deadline, touched),
                          plan.backends)
    if problems:
        raise RuntimeChangeFailed("the running servers differ from the UPDATE: " + "; ".join(problems))


def _run(stats_socket: Path, command: Command, deadline: float) -> None:
    answer = _send(stats_socket, command.text, deadline).strip()
    if not command.accepts(answer):
        raise RuntimeChangeFailed(f"HAProxy answered {answer[:200]!r} to {command.text!r}")


# `show stat` columns that count what a server still holds: sessions, and server-side
# connections in use, idle or idle and safe to reuse. A slot holding any keeps them to
# its old address, so it is not handed to another one (see `slot_reusable`).
HELD = ("scur", "used_conn_cur", "idle_conn_cur", "safe_conn_cur")


def backend_ids(stats_socket: Path, deadline: float) -> dict[str, str]:
    """Each backend's number, from the backend rows of `show stat` (a few lines): a
    frontend of the same name would answer to the name."""
    try:
        rows = parse_stat_csv(_send(stats_socket, "show stat -1 2 -1", deadline))
    except ValueError as exc:
        raise RuntimeChangeFailed(str(exc)) from None
    return {row["pxname"]: row["iid"] for row in rows if row.get("svname") == "BACKEND"}


def read_slot(stats_socket: Path, deadline: float, backend_id: str,
              position: int) -> Mapping[str, str] | None:
    """The `show stat` row of the server at `position` (0-based) in its backend's lines:
    HAProxy numbers a file's servers 1, 2, ... in the file's order."""
    try:
        rows = parse_stat_csv(_send(stats_socket, f"show stat {backend_id} 4 {position + 1}",
                                    deadline))
    except ValueError as exc:
        raise RuntimeChangeFailed(str(exc)) from None
    return rows[0] if len(rows) == 1 else None


def slot_reusable(row: Mapping[str, str] | None, slot: Slot, node: Node) -> bool:
    """Whether `node` may fill `slot`, whose server `show stat` reported as `row`.

    Drained, yes. Still holding connections, only if the server is still at the node's
    own address and port: they are connections to that node (the node was removed and
    comes back, as the keep-alive bench's alternating node sets do every second UPDATE).
    """
    if row is None or row.get("svname") != slot.name:
        return False
    try:
        if all(int(row.get(column) or 0) == 0 for column in HELD):
            return True
    except ValueError:
        return False
    host, _, port = row.get("addr", "").rpartition(":")
    return port == str(node.port) and _same_address(host.strip("[]"), node.address)


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
