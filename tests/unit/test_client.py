"""Unit tests for libra_worker.client (libra-client): message input and exit codes."""

from __future__ import annotations

import errno
import io
import json
import socket
import struct
import threading

import gearman.client
import pytest

from libra_worker import client
from libra_worker.client import EXIT_UNREACHABLE, main, read_message
from tests.integration.support import free_port


@pytest.mark.parametrize("argument, action", [
    ("DISCOVER", "DISCOVER"), ("discover", "DISCOVER"), ("Stats", "STATS"), ("delete", "DELETE"),
])
def test_bare_action_names(argument, action):
    assert json.loads(read_message(argument)) == {"hpcs_action": action}


def test_raw_json_passed_through_unchanged():
    text = '{"hpcs_action": "UPDATE", "loadBalancers": []}'
    assert read_message(text) == text


def test_a_word_that_is_no_action_is_refused_before_sending():
    with pytest.raises(client.UsageError, match="'FROB' is not an action"):
        read_message("FROB")


def test_raw_json_with_any_action_is_still_sent():
    assert read_message('{"hpcs_action": "FROB"}') == '{"hpcs_action": "FROB"}'


def test_usage_errors_are_one_line_and_exit_2(capsys):
    assert main(["lb-1", "FROB"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["--no-such-option", "lb-1", "STATS"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("libra-client: unrecognized arguments") and err.count("\n") == 1


def test_version_and_exit_codes_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("libra-client ")
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for line in ("0  every reply says PASS", "1  a reply says FAIL", "2  usage error",
                 "3  no reply in time", "4  no job server reachable"):
        assert line in help_text


def test_workers_file(tmp_path):
    names = tmp_path / "workers"
    names.write_text("lb-1\n\n# spare\nlb-2  # rack 4\n")
    assert client.read_workers(names) == ["lb-1", "lb-2"]


def test_admin_status_lines_are_read_into_available_workers():
    text = "lb-1\t0\t0\t1\nlb-2\t3\t1\t0\n.\n"
    assert client.parse_status(text) == {"lb-1": 1, "lb-2": 0}


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"hpcs_action": "STATS"}\n'))
    assert read_message("-") == '{"hpcs_action": "STATS"}\n'


def test_at_file(tmp_path):
    message = tmp_path / "update.json"
    message.write_text('{"hpcs_action": "ENABLE"}', encoding="utf-8")
    assert read_message(f"@{message}") == '{"hpcs_action": "ENABLE"}'


def test_at_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_message(f"@{tmp_path / 'absent.json'}")


def _closed_loopback_port() -> int:
    """A port below the ephemeral range on 127.0.0.1 that refuses connections right now."""
    for port in range(4731, 4800):
        with socket.socket() as probe:
            probe.settimeout(0.5)
            result = probe.connect_ex(("127.0.0.1", port))
        if result == errno.ECONNREFUSED:
            return port
    pytest.fail("no closed loopback port found in 4731-4799")


def test_exit_4_when_no_job_server(capsys):
    port = _closed_loopback_port()
    code = main(["--servers", f"127.0.0.1:{port}", "--timeout", "0.5", "lb-test", "DISCOVER"])
    assert code == EXIT_UNREACHABLE == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("libra-client: cannot reach a job server at 127.0.0.1:")
    assert captured.err.count("\n") == 1


def test_exit_2_on_bad_servers_option(capsys):
    assert main(["--servers", "127.0.0.1:notaport", "lb-test", "DISCOVER"]) == 2
    assert "is not host:port" in capsys.readouterr().err


def test_exit_2_on_unreadable_message_file(tmp_path, capsys):
    assert main(["--servers", "127.0.0.1:4730", "lb-test", f"@{tmp_path / 'absent.json'}"]) == 2
    assert capsys.readouterr().err.startswith("libra-client: ")


@pytest.mark.parametrize("answer, code", [
    ({"hpcs_action": "DISCOVER", "hpcs_response": "PASS"}, 0),
    ({"hpcs_action": "DISCOVER", "hpcs_response": "FAIL", "hpcs_error": "x"}, 1),
    ({"hpcs_action": "DISCOVER"}, 1),
])
def test_exit_code_follows_reply(monkeypatch, capsys, answer, code):
    sent = []

    def fake_submit(servers, function, message, timeout, tls, require_worker):
        sent.append((servers, function, message, timeout, tls, require_worker))
        return answer

    monkeypatch.setattr(client, "submit", fake_submit)
    assert main(["--timeout", "3", "lb-7", "discover"]) == code
    assert sent == [("127.0.0.1:4730", "lb-7", '{"hpcs_action": "DISCOVER"}', 3.0, None, True)]
    assert json.loads(capsys.readouterr().out) == answer


# --------------------------------------------------------------------------- fan-out through
# fake job servers: each takes SUBMIT_JOB and either answers like gearmand with a worker
# (JOB_CREATED, then WORK_COMPLETE) or resets the connection at a chosen point.

SUBMIT_JOB, JOB_CREATED, WORK_COMPLETE = 7, 8, 13


class FakeJobServer:
    """A job server on 127.0.0.1. `reset`: None answers every job; "before-created" resets
    the connection on a job's SUBMIT_JOB; "killed" does that and stops listening, as a
    gearmand killed under the client; "after-created" resets it after JOB_CREATED."""

    def __init__(self, reset: str | None = None) -> None:
        self.reset = reset
        self.submitted: list[bytes] = []  # function names, in arrival order
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in _serve
        except OSError:
            pass  # a "killed" server's listener is closed already
        self.listener.close()
        self.thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(connection,), daemon=True).start()

    def _talk(self, connection: socket.socket) -> None:
        with connection:
            buffer = b""
            while True:
                while len(buffer) < 12 or len(buffer) < 12 + struct.unpack(">I", buffer[8:12])[0]:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                kind, size = struct.unpack(">II", buffer[4:12])
                body, buffer = buffer[12:12 + size], buffer[12 + size:]
                if kind != SUBMIT_JOB:
                    continue
                function, _unique, payload = body.split(b"\0", 2)
                self.submitted.append(function)
                handle = f"H:fake:{len(self.submitted)}".encode()
                if self.reset == "killed":
                    self.listener.shutdown(socket.SHUT_RDWR)
                if self.reset in ("before-created", "killed"):
                    return self._reset(connection)
                connection.sendall(_packet(JOB_CREATED, handle))
                if self.reset == "after-created":
                    return self._reset(connection)
                reply = {**json.loads(payload), "hpcs_response": "PASS", "worker": function.decode()}
                connection.sendall(_packet(WORK_COMPLETE, handle + b"\0" + json.dumps(reply).encode()))

    @staticmethod
    def _reset(connection: socket.socket) -> None:
        # Linger 0: close() sends a RST, as a killed gearmand's kernel does.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _packet(kind: int, body: bytes) -> bytes:
    return b"\0RES" + struct.pack(">II", kind, len(body)) + body


@pytest.fixture
def fake_job_servers():
    made: list[FakeJobServer] = []

    def make(reset: str | None = None) -> FakeJobServer:
        made.append(FakeJobServer(reset))
        return made[-1]

    yield make
    for server in made:
        server.close()


FUNCTIONS = [f"lb-fake-{index}" for index in range(4)]


@pytest.mark.parametrize("first, reset", [("resetting", "before-created"), ("resetting", "killed"),
                                          ("answering", "before-created")])
def test_jobs_a_job_server_resets_before_creating_them_go_to_the_other(fake_job_servers, monkeypatch,
                                                                       first, reset):
    resetting, answering = fake_job_servers(reset), fake_job_servers()
    servers = [resetting, answering] if first == "resetting" else [answering, resetting]
    # pygearman shuffles the job servers per job; in the given order instead, every job
    # starts at the first one: all at the resetting one (the other not even connected
    # yet), or all served at once while the resetting one is never used.
    monkeypatch.setattr(gearman.client.random, "shuffle", lambda items: None)
    results = client.submit_many(", ".join(f"127.0.0.1:{s.port}" for s in servers), FUNCTIONS,
                                 '{"hpcs_action": "STATS"}', timeout=10)
    assert [(r.worker, r.outcome, r.reply["worker"]) for r in results] == [
        (f, client.PASS, f) for f in FUNCTIONS]
    assert sorted(answering.submitted) == [f.encode() for f in FUNCTIONS]
    assert len(resetting.submitted) == (1 if first == "resetting" else 0)


def test_a_job_created_before_the_reset_is_lost_not_sent_twice(fake_job_servers, monkeypatch):
    losing, answering = fake_job_servers("after-created"), fake_job_servers()
    monkeypatch.setattr(gearman.client.random, "shuffle", lambda items: None)
    results = client.submit_many(f"127.0.0.1:{losing.port}, 127.0.0.1:{answering.port}",
                                 FUNCTIONS, '{"hpcs_action": "STATS"}', timeout=10)
    lost = [r for r in results if r.outcome != client.PASS]
    # The first job was created, then its server reset: the worker may run it, so it is
    # reported lost; the others had no handle yet and were served by the other server.
    assert [(r.worker, r.outcome, r.error) for r in lost] == [
        (FUNCTIONS[0], client.TIMEOUT, "its job server was lost before the reply")]
    assert losing.submitted == [FUNCTIONS[0].encode()]
    assert sorted(answering.submitted) == [f.encode() for f in FUNCTIONS[1:]]


def test_every_job_server_resetting_is_unreachable(fake_job_servers):
    servers = [fake_job_servers("before-created") for _ in range(2)]
    with pytest.raises(client.Unreachable, match="cannot reach a job server at 127.0.0.1:"):
        client.submit_many(", ".join(f"127.0.0.1:{s.port}" for s in servers), FUNCTIONS[:1],
                           '{"hpcs_action": "STATS"}', timeout=10)
    # Each job server was given the job once, then no more.
    assert [s.submitted for s in servers] == [[FUNCTIONS[0].encode()]] * 2
