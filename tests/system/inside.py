"""Helpers that run inside a systemd sandbox (its network has only `lo`), started with
`Sandbox.popen` and the checkout's Python; each prints one JSON line when it is ready (and
`traffic`, another when it stops), and runs until SIGTERM.

    python -m tests.system.inside backend NAME PORT      an HTTP node answering NAME
    python -m tests.system.inside swift                  the test Swift (endpoint, token)
    python -m tests.system.inside traffic PORT INTERVAL  one request every INTERVAL s

The real components are the integration tests' own (tests/integration/support.py,
tests/swift_server.py); only where they run differs.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from tests.integration.support import LOOPBACK, HTTPBackend
from tests.swift_server import SwiftServer

# Answers of about 2 KB: METRICS' 0.1% tolerance is then many whole answers.
PADDING = 2000


def say(document: dict[str, Any]) -> None:
    print(json.dumps(document), flush=True)


def until_terminated() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


def backend(name: str, port: str) -> None:
    node = HTTPBackend(name, port=int(port), padding=PADDING).start()
    say({"name": name, "port": node.port})
    until_terminated()
    node.stop()


def swift() -> None:
    server = SwiftServer.start()
    try:
        say({"endpoint": server.endpoint, "token": server.token})
        until_terminated()
    finally:
        server.stop()


def traffic(port: str, interval: str) -> None:
    """HTTP/1.1 requests on fresh connections, one every `interval` s, sending back the
    persistence cookie as a browser does; at SIGTERM, how many were answered whole, which
    failed (when, why) and every byte received."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pause = float(interval)
    answered, received, failures = 0, 0, []
    cookie = b""
    say({"started": time.time()})
    while not stop.is_set():
        began = time.monotonic()
        data = b""
        try:
            with socket.create_connection((LOOPBACK, int(port)), timeout=5) as connection:
                connection.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
                                   + cookie + b"\r\n")
                while chunk := connection.recv(65536):
                    data += chunk
            if not re.match(rb"HTTP/1\.[01] 200 ", data):
                raise OSError(f"answer {data[:40]!r}")
            given = re.search(rb"(?im)^set-cookie: *(SERVERID=[^;\r\n]+)", data)
            if given:
                cookie = b"Cookie: " + given[1] + b"\r\n"
            answered += 1
        except OSError as exc:
            failures.append({"at": time.time(), "error": str(exc)[:120]})
        received += len(data)
        stop.wait(max(0.0, pause - (time.monotonic() - began)))
    say({"answered": answered, "failures": failures, "received": received,
         "stopped": time.time()})


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"backend": backend, "swift": swift, "traffic": traffic}[command](*arguments)
