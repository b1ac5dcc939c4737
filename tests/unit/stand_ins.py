"""Stand-ins shared by unit tests: a unix socket that answers as HAProxy's stats socket does."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Mapping


class FakeStatsSocket:
    """A unix stream socket answering each connection's one command, like HAProxy's: with a
    fixed text, or from a table by command ("Unknown command." for any other). It records
    the commands received, as sent (newline included)."""

    def __init__(self, answer: str | Mapping[str, str], path: Path | None = None) -> None:
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
        self.server.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def received(self) -> list[str]:
        """The commands received, without their newlines."""
        return [command.strip() for command in self.commands]

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
                command = received.decode()
                self.commands.append(command)
                answer = (self.answer if isinstance(self.answer, str)
                          else self.answer.get(command.strip(), "Unknown command.\n\n"))
                connection.sendall(answer.encode())

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.server.close()
        self.thread.join(timeout=2)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
