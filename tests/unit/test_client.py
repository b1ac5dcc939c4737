"""Unit tests for libra_worker.client (libra-client): message input and exit codes."""

from __future__ import annotations

import errno
import io
import json
import socket

import pytest

from libra_worker import client
from libra_worker.client import EXIT_UNREACHABLE, main, read_message


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
