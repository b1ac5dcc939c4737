"""Dead and frozen job servers, for real.

* A job server behind a link that goes silent (a network namespace the test makes, the
  link cut with a qdisc that drops everything), killed -9 and restarted while cut: TCP
  keepalive lets the worker notice and re-register once the link is back.
* Two job servers, as Libra ran them: one killed -9, then the other frozen (SIGSTOP) while
  the first is back: jobs through the live one keep flowing, a restarted one gets the
  worker back within 10 s, every accepted job gets exactly one reply.
* A job server that says NOOP and then never answers GRAB_JOB (a frozen peer caught at the
  worst moment) cannot stall the jobs of the other: `answer_timeout` drops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import Iterator

import pytest

from libra_worker import client
from tests.integration.support import (
    Gearmand,
    free_port,
    gearmand_server,
    make_temp_dir,
    stop_child,
    wait_until,
)

# Test settings: a vanished peer is declared dead after 1 + 1 * 2 s of silence.
FAST_KEEPALIVE = {"keepidle": "1", "keepintvl": "1", "keepcnt": "2", "connect_timeout": "2"}
IP = "/usr/sbin/ip"
TC = "/usr/sbin/tc"


def run(*command: str) -> str:
    return subprocess.run(list(command), check=True, capture_output=True, text=True, timeout=30).stdout


class Link:
    """A veth pair: 198.18.N.1/30 here (and nowhere else), 198.18.N.2/30 inside a network
    namespace made for the test. Both addresses exist only on this veth, so no packet can
    leave the machine."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"lw-far-{tag}"
        self.near, self.far = f"lwn{tag}", f"lwf{tag}"
        self.subnet = self._unused_subnet()
        self.near_address, self.far_address = f"{self.subnet}.1", f"{self.subnet}.2"
        self.cut_with: list[str] | None = None

    @staticmethod
    def _unused_subnet() -> str:
        in_use = run(IP, "-o", "addr")
        for _ in range(100):
            subnet = f"198.18.{random.randint(0, 255)}"
            if f" {subnet}." not in in_use:
                return subnet
        raise RuntimeError("no unused /30 in 198.18.0.0/16")

    def up(self) -> "Link":
        run(IP, "netns", "add", self.namespace)
        run(IP, "link", "add", self.near, "type", "veth", "peer", "name", self.far,
            "netns", self.namespace)
        run(IP, "addr", "add", f"{self.near_address}/30", "dev", self.near)
        run(IP, "-n", self.namespace, "addr", "add", f"{self.far_address}/30", "dev", self.far)
        run(IP, "link", "set", self.near, "up")
        run(IP, "-n", self.namespace, "link", "set", self.far, "up")
        run(IP, "-n", self.namespace, "link", "set", "lo", "up")
        route = run(IP, "route", "get", self.far_address)
        assert f"dev {self.near}" in route, f"the far address must route over the veth only: {route}"
        return self

    def _far_qdisc(self, action: str, *kind: str) -> None:
        run(IP, "netns", "exec", self.namespace, TC, "qdisc", action, "dev", self.far, "root", *kind)

    def cut(self) -> None:
        """Nothing from the far side arrives any more: to the worker, a silent peer.

        The drop sits on the far end only: a qdisc that drops the worker's own packets
        locally would be reported to its TCP as congestion, which keepalive retries instead
        of counting as unanswered probes; a real partition drops them elsewhere.
        netem loss 100% where the kernel has it, else a FIFO that holds no packet at all.
        """
        for kind in (["netem", "loss", "100%"], ["pfifo", "limit", "0"]):
            try:
                self._far_qdisc("add", *kind)
            except subprocess.CalledProcessError as exc:
                if "unknown" not in exc.stderr.lower():
                    raise
                continue
            self.cut_with = kind
            return
        raise AssertionError("the kernel has neither the netem nor the pfifo qdisc")

    def restore(self) -> None:
        self._far_qdisc("del")
        self.cut_with = None

    def remove(self) -> None:
        # Deleting the namespace destroys its veth end and with it the pair.
        subprocess.run([IP, "netns", "del", self.namespace], capture_output=True, timeout=30)
        subprocess.run([IP, "link", "del", self.near], capture_output=True, timeout=30)


class FarGearmand(Gearmand):
    """gearmand inside the far namespace; whether it listens is asked there, link or not."""

    def __init__(self, root, link: Link) -> None:
        super().__init__(root, free_port(), host=link.far_address,
                         command_prefix=(IP, "netns", "exec", link.namespace))
        self.link = link

    def accepts(self) -> bool:
        listening = subprocess.run(
            [IP, "netns", "exec", self.link.namespace, "ss", "-Hltn", f"sport = :{self.port}"],
            capture_output=True, text=True, timeout=10).stdout
        return bool(listening.strip())


@pytest.fixture
def link() -> Iterator[Link]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    made = Link()
    try:
        yield made.up()
    finally:
        made.remove()


def test_a_job_server_lost_behind_a_silent_link_is_found_again(worker_factory, link):
    root = make_temp_dir()
    server = FarGearmand(root, link)
    try:
        server.start()
        worker = worker_factory(servers=[server.address], gearman_options=FAST_KEEPALIVE)
        assert worker.submit("DISCOVER")["hpcs_response"] == "PASS"

        link.cut()
        stop_child(server.process, signal.SIGKILL)  # its FIN is lost on the cut link
        server.start()  # a new gearmand that has never heard of the worker
        time.sleep(5)  # longer than keepidle + keepintvl * keepcnt
        link.restore()
        restored = time.monotonic()

        reply = worker.submit("DISCOVER", timeout=10)
        assert reply["hpcs_response"] == "PASS"
        assert time.monotonic() - restored <= 10
        log = worker.log_text()
        assert (f"Job server {server.address} lost: connection timed out (keepalive probes"
                in log), log
        assert "is back after" in log, log
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


class Submitter:
    """DISCOVER jobs one after another in a thread, to whichever server `target` names;
    records when each reply came and on which server."""

    def __init__(self, worker, target: str) -> None:
        self.worker = worker
        self.target = target
        self.replies: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            target = self.target
            try:
                reply = self.worker.submit("DISCOVER", timeout=5, servers=[target])
                assert reply["hpcs_response"] == "PASS", reply
                self.replies.append((time.monotonic(), target))
            except client.TransportError as exc:
                self.errors.append(f"{target}: {exc}")
            time.sleep(0.05)

    def largest_gap(self, since: float, until: float) -> float:
        times = [since] + [t for t, _ in self.replies if since <= t <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:]))

    def __enter__(self) -> "Submitter":
        self._thread.start()
        wait_until(lambda: self.replies, 10, "the first reply")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def discover_runs(journal) -> list[str]:
    """The handle of every DISCOVER the worker ran, in order: one final line each (a
    DISCOVER answered in place has no RUNNING line)."""
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    return [r["handle"] for r in records if r["action"] == "DISCOVER" and r["state"] != "RUNNING"]


def registered(server: Gearmand, function: str) -> bool:
    return server.function_status(function)[2] >= 1


def test_two_job_servers_one_killed_then_the_other_frozen(worker_factory):
    with gearmand_server() as first, gearmand_server() as second:
        worker = worker_factory(servers=[first.address, second.address],
                                gearman_options={"answer_timeout": "1"})
        wait_until(lambda: registered(first, worker.function) and registered(second, worker.function),
                   10, "the worker registered at both job servers")
        journal = worker.state_dir / "jobs.journal"
        runs_before = len(discover_runs(journal))
        with Submitter(worker, second.address) as jobs:
            killed = time.monotonic()
            stop_child(first.process, signal.SIGKILL)
            time.sleep(3)
            first.start()
            restarted = time.monotonic()
            wait_until(lambda: registered(first, worker.function), 10,
                       "the worker re-registered at the restarted job server")
            assert time.monotonic() - restarted <= 10
            assert jobs.largest_gap(killed, time.monotonic()) <= 2, jobs.replies

            jobs.target = first.address
            time.sleep(0.5)
            os.kill(second.process.pid, signal.SIGSTOP)
            try:
                frozen = time.monotonic()
                time.sleep(4)
                assert jobs.largest_gap(frozen, time.monotonic()) <= 2, jobs.replies
            finally:
                os.kill(second.process.pid, signal.SIGCONT)
            jobs.target = second.address
            thawed = time.monotonic()
            wait_until(lambda: any(t > thawed and s == second.address for t, s in jobs.replies),
                       10, "a reply through the thawed job server")
        assert not jobs.errors, jobs.errors
        # Exactly one reply per accepted job (no errors above), and no job ran twice: one
        # run per reply. (Handles repeat across job servers, so runs are counted; a ping's
        # line is written just after its answer.)
        wait_until(lambda: len(discover_runs(journal)) - runs_before >= len(jobs.replies), 5,
                   "the journal lines of the last answers")
        assert len(discover_runs(journal)) - runs_before == len(jobs.replies)
        assert worker.log_text().count("is back after") >= 1


class SilentJobServer:
    """A peer that accepts the worker, says NOOP ("a job is waiting") and then never answers:
    what a job server frozen right after waking the worker looks like from the worker."""

    NOOP = b"\0RES" + (6).to_bytes(4, "big") + (0).to_bytes(4, "big")
    GRAB_JOBS = (b"\0REQ" + (9).to_bytes(4, "big"), b"\0REQ" + (30).to_bytes(4, "big"))

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.accepted: list[socket.socket] = []
        self.received = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                self.accepted.append(connection)
                connection.sendall(self.NOOP)
                threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := connection.recv(4096):
                self.received += chunk

    def asked_for_a_job(self) -> bool:
        """The worker sent GRAB_JOB: it now holds its one job slot for this server."""
        return any(packet in self.received for packet in self.GRAB_JOBS)

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_a_job_server_that_never_answers_cannot_stall_the_others(worker_factory, gearmand):
    silent = SilentJobServer()
    try:
        worker = worker_factory(start=False, servers=[f"127.0.0.1:{silent.port}", gearmand.address],
                                gearman_options={"answer_timeout": "1"})
        worker.spawn()
        wait_until(silent.asked_for_a_job, 10, "the worker to ask the silent server for a job")
        # Without answer_timeout the first of these would wait forever.
        for _ in range(5):
            assert worker.submit("DISCOVER", timeout=5, servers=[gearmand.address])[
                "hpcs_response"] == "PASS"
        assert "no answer within 1 s (answer_timeout)" in worker.log_text()
    finally:
        silent.close()
