"""Server slots: which server line of each backend serves which node, and the spare ones.

Every backend is rendered with spare server lines beyond its nodes: placeholders in
maintenance, at a loopback address nothing ever contacts (HAProxy 2.6 runs no health
check on a server in maintenance). A node added by a node-only UPDATE fills a spare with
`set server ... addr` (see runtime.py) instead of `add server`: HAProxy reuses
server-side connections to servers of the file, never to servers added at runtime.

Names: a node placed by a reload is served under its own id, so logs and archived lines
keep naming nodes. Spares are named `slot:<n>`, which no node id can be (ids match
`[A-Za-z0-9_.-]{1,64}`); a node filling one is served under that name until the next
reload that renders the whole device again (`fresh`).

Backup is a property of the server line that the Runtime API cannot change, so each slot
has a kind (backup or not) and a node only ever fills a slot of its own kind.

The layout is part of what the file renders: it is saved with the desired state
(`to_document`), and `from_document` reads it back, checked against the device it
belongs to, so the live file can be rendered again byte for byte.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

from libra_worker.messages import Device, LoadBalancer, Node

SPARE_PREFIX = "slot:"
# Where an empty slot points: loopback, and in maintenance, so never contacted. One
# address for all: HAProxy warns of no duplicate (and derives cookies only for servers
# that serve).
PLACEHOLDER_ADDRESS = "127.0.0.1"
PLACEHOLDER_PORT = 1
# Spares of a kind per backend: at least the minimum ([haproxy] spare_servers for normal
# servers, BACKUP_SPARES for backups), or one per SPARE_SHARE nodes of that kind, so a
# large backend does not run out after a few adds while its spares stay a small part of
# what `haproxy -c` parses.
SPARE_SHARE = 10
BACKUP_SPARES = 2
DEFAULT_SPARES = 8


class Slot(NamedTuple):
    """One server line: its name, its kind, and the id of the node it serves (None: empty).

    An empty slot named `slot:<n>` is free for any node of its kind once its server has
    drained; an empty slot named by a node id is that node's server, retired in
    maintenance by an earlier UPDATE, and only that node may have it back.

    A named tuple: a reload makes one per server line, and a frozen dataclass took twice
    as long to make.
    """

    name: str
    backup: bool
    node: str | None = None

    @property
    def spare(self) -> bool:
        return self.name.startswith(SPARE_PREFIX)


# Per load balancer, in the device's order, its server lines in the file's order.
Layout = tuple[tuple[Slot, ...], ...]


def spares_for(count: int, minimum: int) -> int:
    return max(minimum, math.ceil(count / SPARE_SHARE))


def fresh(device: Device, spares: int = DEFAULT_SPARES) -> Layout:
    """What a reload renders: each node under its own id, then new spares of each kind."""
    return tuple(_fresh_backend(lb, spares) for lb in device.loadbalancers)


def _fresh_backend(lb: LoadBalancer, spares: int) -> tuple[Slot, ...]:
    slots = [Slot(node.id, node.backup, node.id) for node in lb.nodes]
    backups = sum(node.backup for node in lb.nodes)
    normal = spares_for(len(lb.nodes) - backups, spares)
    extra = spares_for(backups, BACKUP_SPARES)
    slots += [Slot(f"{SPARE_PREFIX}{n}", False) for n in range(1, normal + 1)]
    slots += [Slot(f"{SPARE_PREFIX}{n}", True) for n in range(normal + 1, normal + extra + 1)]
    return tuple(slots)


def placeholder(slot: Slot) -> Node:
    """The node an empty slot's line is rendered from: in maintenance, never contacted."""
    return Node(id=slot.name, address=PLACEHOLDER_ADDRESS, port=PLACEHOLDER_PORT,
                backup=slot.backup, enabled=False)


def servers(lb: LoadBalancer, slots: Sequence[Slot]) -> list[tuple[str, Node]]:
    """Each server line of `lb` in order: its name and the node it is rendered from."""
    nodes = {node.id: node for node in lb.nodes}
    return [(slot.name, placeholder(slot) if slot.node is None else nodes[slot.node])
            for slot in slots]


def to_document(layout: Layout) -> list[list[Any]]:
    """The JSON form saved in state.json: a node served under its own id is just that id
    (its kind is the node's), any other slot [name, backup, node id or null]."""
    return [[slot.name if slot.node == slot.name else [slot.name, slot.backup, slot.node]
             for slot in slots] for slots in layout]


def from_document(document: Any, device: Device) -> Layout | None:
    """The layout saved with `device`, or None if it is missing or does not fit it (a
    state file of a release without slots, or edited by hand)."""
    if not isinstance(document, list) or len(document) != len(device.loadbalancers):
        return None
    layout = []
    for entries, lb in zip(document, device.loadbalancers):
        nodes = {node.id: node for node in lb.nodes}
        if not isinstance(entries, list):
            return None
        slots = []
        for entry in entries:
            if isinstance(entry, str) and entry in nodes:
                slots.append(Slot(entry, nodes[entry].backup, entry))
            elif (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                  and isinstance(entry[1], bool) and (entry[2] is None or entry[2] in nodes)):
                slots.append(Slot(*entry))
            else:
                return None
        if not _fits(slots, lb):
            return None
        layout.append(tuple(slots))
    return tuple(layout)


def _fits(slots: Sequence[Slot], lb: LoadBalancer) -> bool:
    """Names unique and of either form, every node in exactly one slot of its kind."""
    names = [slot.name for slot in slots]
    if len(set(names)) != len(names) or not all(_valid_name(name) for name in names):
        return False
    placed = [slot for slot in slots if slot.node is not None]
    kinds = {node.id: node.backup for node in lb.nodes}
    return (len(placed) == len(kinds) and {slot.node for slot in placed} == kinds.keys()
            and all(kinds[slot.node] == slot.backup for slot in placed))


def _valid_name(name: str) -> bool:
    if name.startswith(SPARE_PREFIX):
        return name[len(SPARE_PREFIX):].isdigit()
    return 0 < len(name) <= 64 and all(c.isalnum() and c.isascii() or c in "_.-" for c in name)
