"""Crash-safe file replacement: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import glob
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, *,
                 durable: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.

    `durable=False` skips both fsyncs, for a file the caller can rebuild after a power cut
    (a reader still sees the old file or the new one, never half of one).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _rename_into_place(_temporary_beside(path, payload, mode, durable), path, durable)


class StagedFile:
    """`data` written and fsynced beside `path` now, renamed over it by `commit` later (or
    removed by `discard`): the slow half of a durable write can run while the caller
    waits for something else, and only the rename is left for the moment it must happen."""

    def __init__(self, path: Path, data: str, mode: int = 0o600) -> None:
        self.path = path
        self._temporary: str | None = _temporary_beside(path, data.encode("utf-8"), mode, True)
        # Renamed over `path`: what a reader (a restarted worker) finds from then on, even
        # if what follows the rename (its directory's fsync) is cut short by the job's alarm.
        self.in_place = False

    def commit(self) -> None:
        if self._temporary is None:
            raise RuntimeError(f"{self.path}: staged data already committed or discarded")
        temporary, self._temporary = self._temporary, None
        _replace(temporary, self.path)
        self.in_place = True
        fsync_directory(self.path.parent)

    def discard(self) -> None:
        if self._temporary is not None:
            Path(self._temporary).unlink(missing_ok=True)
            self._temporary = None


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left beside `path`; the
    ones removed. Only while no other process may be writing `path`."""
    leftovers = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def _rename_into_place(temporary: str, path: Path, durable: bool) -> None:
    _replace(temporary, path)
    if durable:
        fsync_directory(path.parent)


def _replace(temporary: str, path: Path) -> None:
    try:
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise _naming(exc, path) from None


def create_once(path: Path, data: str, mode: int = 0o600) -> bool:
    """Create `path` holding `data` unless it exists; False if it already did.

    Written and fsynced under a temporary name, then hard-linked into place, which fails
    if the name is taken: of two processes creating the same file at once, one wins and
    both then read the winner's content, never half of it.
    """
    temporary = _temporary_beside(path, data.encode("utf-8"), mode, durable=True)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    fsync_directory(path.parent)
    return True


def _temporary_beside(path: Path, payload: bytes, mode: int, durable: bool) -> str:
    """`payload` in a new temporary file in `path`'s directory (fsynced if `durable`),
    with `mode`; its name. Removed again if anything fails."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(temporary, mode)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def _naming(error: OSError, path: Path) -> OSError:
    """A full disk fails a write with no file name; the operator needs to know which."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror, str(path))


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def restrict_directory(path: Path, allowed: int = 0o750) -> None:
    """Clear any permission bit of `path` outside `allowed`; a tighter mode is kept.

    The state dir holds the device's configuration, sockets and tenant access logs:
    nobody but the worker's user (and its group, read-only) may look inside.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & ~allowed:
        os.chmod(path, mode & allowed)
