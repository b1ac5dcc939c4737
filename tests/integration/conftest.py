"""Fixtures for the worker's integration tests: real gearmand, worker, HAProxy and backends.

Nothing is mocked. One gearmand serves each test module (every worker registers its own
unique function name, so workers of different tests never see each other's jobs); each
test gets its own worker on its own state dir, and backends that answer with their name.
See tests/integration/support.py for the helpers behind these fixtures.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterator

import pytest

from tests.integration.support import (
    GEARMAND,
    Backend,
    Gearmand,
    HTTPBackend,
    TCPBackend,
    Worker,
    WorkerFactory,
    free_port as _free_port,
    make_temp_dir,
    traffic as _traffic,
)
from tests.integration.libra_servers import LibraServers
from tests.swift_server import SwiftServer


def pytest_configure(config: pytest.Config) -> None:
    # Never skipped silently: a machine without the real components fails loudly.
    missing = [path for path in (GEARMAND,) if not os.access(path, os.X_OK)]
    if missing or shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
        raise pytest.UsageError(
            f"integration tests need gearmand ({GEARMAND}) and haproxy installed; missing: "
            f"{missing or ['haproxy']}"
        )


@pytest.fixture(scope="module")
def gearmand() -> Iterator[Gearmand]:
    """One real gearmand for the module, in the foreground, stopped by pid."""
    root = make_temp_dir()
    server = Gearmand(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swift() -> Iterator[SwiftServer]:
    """A real all-in-one Swift on loopback for the module (tests/swift_server.py)."""
    server = SwiftServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def worker_factory(gearmand: Gearmand) -> Iterator[WorkerFactory]:
    """`worker_factory(start=True, servers=None, **options)` -> a running `Worker`.

    Each worker has its own temp dir, state dir and function name; all of them, and the
    HAProxy and log sink they started, are stopped by pid when the test ends.
    """
    factory = WorkerFactory([gearmand.address])
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def worker(worker_factory: WorkerFactory) -> Worker:
    return worker_factory()


@pytest.fixture
def submit(worker: Worker) -> Callable[..., dict[str, Any]]:
    """`submit("STATS")` or `submit({...})` or `submit("raw text")` -> the worker's reply."""
    return worker.submit


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


@pytest.fixture
def traffic() -> Callable[[str, int], Any]:
    """`traffic("http://127.0.0.1:P/", n)` or `traffic("tcp://127.0.0.1:P", n)` -> (Counter, failures)."""
    return _traffic


def _started_backends(kind: type[Backend]) -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def make(name: str) -> Backend:
        backend = kind(name).start()
        started.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in started:
            backend.stop()


@pytest.fixture
def http_backend() -> Iterator[Callable[[str], HTTPBackend]]:
    """`http_backend("name")` -> a started HTTP node answering "name"; /health is flippable."""
    yield from _started_backends(HTTPBackend)


@pytest.fixture
def tcp_backend() -> Iterator[Callable[[str], TCPBackend]]:
    """`tcp_backend("name")` -> a started TCP node answering "name" to one line."""
    yield from _started_backends(TCPBackend)


@pytest.fixture
def libra(gearmand) -> Iterator[LibraServers]:
    """Libra's API and admin servers' client side, on the test job server."""
    servers = LibraServers([gearmand.address])
    try:
        yield servers
    finally:
        servers.close()
