"""etc/libra-worker.logrotate rotates for real: `logrotate -f` while jobs arrive.

The shipped file is used as it is, with its paths pointed at the test worker's files
(log directory, pidfile) and its `su`/`create` owner at the user running the tests.
Its postrotate sends SIGHUP to the pid in the pidfile: the worker re-opens its log.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.integration.support import REPO_ROOT, Worker, WorkerFactory, wait_until

SHIPPED = REPO_ROOT / "etc" / "libra-worker.logrotate"
JOB_LINE = re.compile(r"^\S+ [A-Z]+ libra_worker\S*: Job \S+ .*answered ", re.MULTILINE)

pytestmark = pytest.mark.skipif(shutil.which("logrotate") is None,
                                reason="logrotate is not installed")


@pytest.fixture
def worker(worker_factory: WorkerFactory) -> Worker:
    """At DEBUG: a passed DISCOVER's line is a DEBUG one (at INFO pings are only counted)."""
    return worker_factory(log_level="DEBUG")


def logrotate_config(worker: Worker) -> Path:
    """The shipped file, pointed at this worker's files and run as the current user."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = (SHIPPED.read_text()
            .replace("/var/log/libra-worker", str(worker.log_file.parent))
            .replace("/run/libra-worker/worker.pid", str(worker.state_dir / "worker.pid"))
            .replace("su libra libra", f"su {user} {group}")
            .replace("create 0640 libra libra", f"create 0640 {user} {group}"))
    assert not re.search(r"/var/log|/run/|libra libra", text), "the shipped file changed"
    config = worker.root / "logrotate.conf"
    config.write_text(text)
    config.chmod(0o644)
    return config


def job_lines(*paths: Path) -> int:
    return sum(len(JOB_LINE.findall(path.read_text())) for path in paths if path.exists())


def test_rotation_while_jobs_arrive_loses_no_line(worker: Worker) -> None:
    config = logrotate_config(worker)
    # A job's line is written just after its answer: wait for the start-up DISCOVER's.
    wait_until(lambda: job_lines(worker.log_file) >= 1, 10, "the start-up job's line")
    before = job_lines(worker.log_file)
    answered = 0
    failures: list[str] = []
    stop = threading.Event()

    def submit_jobs() -> None:
        nonlocal answered
        while not stop.is_set() and not failures:
            try:
                reply = worker.submit("DISCOVER", timeout=10)
            except Exception as exc:  # reported by the test below
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            assert reply["hpcs_response"] == "PASS", reply
            answered += 1

    def jobs_answered(count: int) -> bool:
        return answered >= count or bool(failures)

    sender = threading.Thread(target=submit_jobs, daemon=True)
    sender.start()
    try:
        wait_until(lambda: jobs_answered(20), 30, "jobs before the rotation")
        result = subprocess.run(
            ["logrotate", "-f", "-s", str(worker.root / "logrotate.state"), str(config)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        after_rotation = answered
        wait_until(lambda: jobs_answered(after_rotation + 20), 30, "jobs after the rotation")
    finally:
        stop.set()
        sender.join(timeout=30)
    assert not failures and worker.is_running(), f"{failures}\n{worker.output()}"
    rotated = worker.log_file.with_name(worker.log_file.name + ".1")
    assert rotated.exists(), "logrotate did not rotate worker.log"
    # Every job answered left exactly one line, in the old or the new file; the new
    # file holds the lines of jobs after the rotation.
    wait_until(lambda: job_lines(rotated, worker.log_file) >= before + answered, 10,
               "the last job's line")
    assert job_lines(rotated, worker.log_file) == before + answered
    assert job_lines(worker.log_file) >= 20
