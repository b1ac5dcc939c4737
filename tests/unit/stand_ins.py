"""Stand-ins shared by unit tests: a unix socket that answers as HAProxy's stats socket does."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from pathlib import Path


class FakeStatsSocket:
    """A unix stream socket answering each connection with a fixed text, like HAProxy's."""

    def __init__(self, answer: str, path: Path | None = None) -> None:
        """Listens on `path`, or on a socket in a temporary directory of its own."""
        self.answer = answer
        self.commands: list[str] = []
        self.directory: str | None = None
        if path is None:
            self.directory = tempfile.mkdtemp(prefix="lw-")
            path = Path(self.directory) / "stats.sock"
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            with connection:
                received = b""
                while not received.endswith(b"\n"):
                    chunk = connection.recv(1024)
                    if not chunk:
                        break
                    received += chunk
                self.commands.append(received.decode())
                connection.sendall(self.answer.encode())

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.server.close()
        self.thread.join(timeout=2)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
