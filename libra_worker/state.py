"""The device's desired state, persisted so a restarted worker can put it back.

The state file is small JSON, replaced atomically. It holds the lifecycle (ACTIVE,
SUSPENDED, DELETED), when it last changed, the validated load-balancer definition of the
last accepted UPDATE (in message form, so it is re-validated when read back) with the server
slots its file renders (drivers/haproxy/slots.py; absent in files of earlier releases), and
what the reconciler has had to repair (restarts, last error).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from libra_worker.fileutil import StagedFile, remove_leftovers

LOG = logging.getLogger(__name__)


class Lifecycle(enum.Enum):
    NEW = "NEW"  # no UPDATE has been accepted yet
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DELETED = "DELETED"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DesiredState:
    lifecycle: Lifecycle = Lifecycle.NEW
    since: str = field(default_factory=utc_now)
    loadbalancers: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0  # HAProxy restarts done by the reconciler
    last_error: str | None = None  # the last crash or failure sentence
    layout: Any = None  # the driver's server slots for `loadbalancers`, in JSON form

    def moved_to(self, lifecycle: Lifecycle, **changes: Any) -> "DesiredState":
        return replace(self, lifecycle=lifecycle, since=utc_now(), **changes)


class StateStore:
    """Reads and writes the state file; an unchanged file is not parsed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[tuple[int, int, int], DesiredState] | None = None

    def load(self) -> DesiredState:
        try:
            version = self._version()
        except FileNotFoundError:
            return DesiredState()
        if self._cached is not None and self._cached[0] == version:
            return self._cached[1]
        state = self._read()
        self._cached = (version, state)
        return state

    def _version(self) -> tuple[int, int, int]:
        status = self.path.stat()
        return status.st_ino, status.st_mtime_ns, status.st_size

    def _read(self) -> DesiredState:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
            return DesiredState(
                lifecycle=Lifecycle(raw["lifecycle"]),
                since=raw["since"],
                loadbalancers=raw.get("loadbalancers", []),
                restarts=int(raw.get("restarts", 0)),
                last_error=raw.get("last_error"),
                layout=raw.get("layout"),
            )
        except FileNotFoundError:
            return DesiredState()
        except (ValueError, KeyError, TypeError) as exc:
            # A corrupt file cannot come from atomic_write; say so loudly and start clean
            # rather than refuse to run the worker at all.
            LOG.error("Ignoring unreadable state file %s: %s", self.path, exc)
            return DesiredState()

    def save(self, state: DesiredState) -> None:
        with self.staging(state) as staged:
            staged.commit()

    @contextlib.contextmanager
    def staging(self, state: DesiredState | Callable[[], DesiredState]
                ) -> Iterator["StagedState"]:
        """`state`, to be saved in two steps (see StagedState); whatever was written and
        not committed is removed when the block ends."""
        staged = StagedState(self, state)
        try:
            yield staged
        finally:
            staged.discard()

    def remove_leftovers(self) -> None:
        """The half-saved states of a worker killed between `write` and `commit` (the
        caller makes sure no other process saves one now)."""
        for leftover in remove_leftovers(self.path):
            LOG.info("Removed %s, a state a killed worker never committed", leftover.name)

    def _text(self, state: DesiredState) -> str:
        # Shallow on purpose: asdict() would deep-copy every node of a large device.
        document = {item.name: getattr(state, item.name) for item in fields(state)}
        document["lifecycle"] = state.lifecycle.value
        # A tree of our own making, so no cycle check; compact: this is rewritten at every
        # UPDATE, with every node in it.
        return json.dumps(document, separators=(",", ":"), check_circular=False) + "\n"

    def _committed(self, state: DesiredState) -> None:
        self._cached = (self._version(), state)


class StagedState:
    """A state saved in two steps: `write` encodes it and makes it durable beside the
    state file (while HAProxy checks the new configuration, say), `commit` renames it into
    place, the moment the change it records becomes the device's.

    `state` may come as the function that makes it, called when the state is first
    needed: a large device's document is then built while HAProxy checks, too.
    """

    def __init__(self, store: StateStore,
                 state: DesiredState | Callable[[], DesiredState]) -> None:
        self.store = store
        self._make = state if callable(state) else lambda: state
        self._file: StagedFile | None = None

    @functools.cached_property
    def state(self) -> DesiredState:
        return self._make()

    def write(self) -> None:
        if self._file is None:
            self._file = StagedFile(self.store.path, self.store._text(self.state))

    def commit(self) -> None:
        self.write()
        assert self._file is not None
        self._file.commit()
        self.store._committed(self.state)

    @property
    def in_place(self) -> bool:
        """Whether the state file holds this state already (see StagedFile.in_place)."""
        return self._file is not None and self._file.in_place

    def discard(self) -> None:
        if self._file is not None:
            self._file.discard()
