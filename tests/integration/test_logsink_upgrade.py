"""An upgrade restarts the detached log sink onto the new code while HAProxy logs traffic.

The sink outlives the worker. Here it runs an "older release" (a copy of the package
with another version, started the way a worker of that release starts it) while the
worker is stopped; the worker of this checkout then starts, notices the sink's code
differs and hands the socket over, all while requests flow through the real HAProxy.
Every request's access line must be in the log exactly once.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest

from libra_worker import __version__, logsink
from libra_worker.drivers.haproxy.process import process_alive
from tests.integration.support import (
    LOOPBACK,
    REPO_ROOT,
    HTTPBackend,
    WorkerFactory,
    lb,
    request_once,
    update,
    wait_until,
)

OLD_VERSION = "0.9.0"
# The last commit whose log sink is release 1.0's.
RELEASE_1_0 = "948cf98"
REQUEST_LINE = re.compile(rb'"GET /req-(\d+) HTTP')


class NumberedRequests:
    """GET /req-<n> back to back in a thread; the numbers that were answered."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{LOOPBACK}:{port}/req-"
        self.answered: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            try:
                request_once(f"{self.url}{number}")
                self.answered.append(number)
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"{number}: {exc}")
            number += 1

    def __enter__(self) -> "NumberedRequests":
        self._thread.start()
        wait_until(lambda: len(self.answered) > 20, 10, "requests before the upgrade")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def older_release(root: Path, sink_of_release_1_0: bool) -> Path:
    """A copy of the package that calls itself OLD_VERSION: other code to a new worker.

    With ``sink_of_release_1_0`` its logsink.py is the one release 1.0 shipped (from the
    repository's history), which knows nothing of hand-overs.
    """
    copy = root / "old"
    shutil.copytree(REPO_ROOT / "libra_worker", copy / "libra_worker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "libra_worker" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', f'"{OLD_VERSION}"'))
    if sink_of_release_1_0:
        shipped = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{RELEASE_1_0}:libra_worker/logsink.py"],
            capture_output=True, timeout=30)
        if shipped.returncode != 0:
            pytest.skip(f"the checkout has no history of release 1.0 ({RELEASE_1_0})")
        (copy / "libra_worker" / "logsink.py").write_bytes(shipped.stdout)
    return copy


def start_old_sink(state_dir: Path, old: Path, *extra: str) -> None:
    """As a worker of the old release would: a detached sink."""
    env = dict(os.environ, PYTHONPATH=str(old))
    subprocess.run([sys.executable, "-m", "libra_worker.logsink", "--state-dir",
                    str(state_dir), "--detach", *extra],
                   cwd=old, env=env, check=True, timeout=30)


def logged_numbers(log_dir: Path) -> list[int]:
    text = b"".join(path.read_bytes() for path in sorted(log_dir.glob("http*.log")))
    return [int(number) for number in REQUEST_LINE.findall(text)]


@pytest.mark.parametrize("old_sink", ["older release", "release 1.0"])
def test_upgrade_moves_the_sink_to_the_new_code_losing_no_line(
        worker_factory: WorkerFactory, http_backend: Callable[[str], HTTPBackend],
        free_port: Callable[[], int], tmp_path: Path, old_sink: str) -> None:
    worker = worker_factory()
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [http_backend("node-a").node()])))[
        "hpcs_response"] == "PASS"
    sink = worker.logsink
    release_1_0 = old_sink == "release 1.0"
    old = older_release(tmp_path, release_1_0)
    assert worker.stop() == 0  # HAProxy and the sink keep running
    if release_1_0:
        # A 1.0 sink cannot take over: it starts where no sink runs, before the traffic.
        sink.stop()
        start_old_sink(worker.state_dir, old)
        wait_until(sink.pid, 15, "the release 1.0 sink")
        assert sink.running_identity() is None

    with NumberedRequests(port) as requests:
        if not release_1_0:
            start_old_sink(worker.state_dir, old, "--take-over")
            wait_until(lambda: f"libra-worker {OLD_VERSION}," in (sink.running_identity() or ""),
                       15, "the old release's sink")
        old_pid = sink.pid()
        before_upgrade = len(requests.answered)
        worker.start()  # the upgraded worker
        assert sink.running_identity() == logsink.code_identity()
        assert sink.pid() not in (None, old_pid)
        wait_until(lambda: len(requests.answered) > before_upgrade + 50, 20,
                   "requests after the upgrade")
    assert not requests.errors, requests.errors[:5]
    wait_until(lambda: not process_alive(old_pid), 10, "the old sink to exit")

    wait_until(lambda: len(logged_numbers(sink.log_dir)) >= len(requests.answered), 10,
               "every access line")
    assert sorted(logged_numbers(sink.log_dir)) == requests.answered
