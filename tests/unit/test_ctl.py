"""Unit tests for `libra-worker ctl`: its command line, exit codes and refusals.

Run in-process through `cli.main` (the real entry point) on a temp state_dir, or as a
real child process where the pipe or stderr matters. HAProxy itself is never started
here (tests/integration/test_ctl.py does that).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from libra_worker import cli, ctl
from libra_worker.state import DesiredState, Lifecycle, StateStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = tmp_path / "worker.conf"
    path.write_text(f"[worker]\nstate_dir = {state_dir}\n")
    return path


def run_ctl_process(*args: str, **options) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "libra_worker.cli", *args], text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, **options)


@pytest.mark.parametrize("argv, expected", [
    (["ctl", "status"], ["status"]),
    (["--config", "F", "ctl", "jobs", "-n", "3"], ["--config", "F", "jobs", "-n", "3"]),
    (["--config=F", "ctl", "status"], ["--config=F", "status"]),
    (["--config", "ctl", "--foreground"], None),  # a config file named "ctl"
    (["--config", "F", "--foreground"], None),
    (["--foreground", "ctl"], None),
    ([], None),
])
def test_ctl_commands_are_recognised_with_config_before_them(argv, expected):
    assert ctl.command_arguments(argv) == expected


@pytest.mark.parametrize("order", [
    ["--config", "{config}", "ctl", "jobs"],
    ["ctl", "--config", "{config}", "jobs"],
    ["ctl", "jobs", "--config", "{config}"],
    ["ctl", "jobs", "--config={config}"],
])
def test_config_is_accepted_before_or_after_the_command(config_file, capsys, order):
    assert cli.main([word.format(config=config_file) for word in order]) == ctl.EXIT_OK
    assert capsys.readouterr().out.startswith("started (UTC)")


@pytest.mark.parametrize("argv, message", [
    (["ctl"], "the following arguments are required: COMMAND"),
    (["ctl", "jobs"], "the following argument is required: --config FILE"),
    (["ctl", "--config", "F", "bogus"], "invalid choice: 'bogus'"),
    (["ctl", "--config", "F", "jobs", "-n", "0"], "argument -n: '0' is not a positive whole number"),
    (["ctl", "--config", "F", "status", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == ctl.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.err.startswith("libra-worker ctl")


def test_a_bad_configuration_is_one_line_naming_the_option_and_exit_2(tmp_path, capsys):
    path = tmp_path / "worker.conf"
    path.write_text(f"[worker]\nstate_dir = {tmp_path}\n[haproxy]\nbind-address = 127.0.0.1\n")
    assert cli.main(["ctl", "--config", str(path), "status"]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "[haproxy] bind-address: unknown option; did you mean bind_address?" in err


def test_status_exits_3_when_the_worker_is_not_running_and_still_prints_it(config_file, capsys):
    assert cli.main(["ctl", "--config", str(config_file), "status"]) == ctl.EXIT_NOT_RUNNING
    out = capsys.readouterr().out
    assert "worker daemon    not running" in out
    assert "actual state     HAProxy not running" in out


def test_status_exits_0_while_the_worker_runs(config_file, capsys):
    state_dir = config_file.parent / "state"
    # A live process stands in for the daemon: status only reads its pidfile.
    (state_dir / "worker.pid").write_text(f"{os.getpid()}\n")
    assert cli.main(["ctl", "--config", str(config_file), "status"]) == ctl.EXIT_OK
    assert f"worker daemon    running, pid {os.getpid()}" in capsys.readouterr().out


@pytest.mark.parametrize("lifecycle, message", [
    (Lifecycle.SUSPENDED, "Cannot restart: the load balancer is SUSPENDED (HAProxy stays stopped); "
                          "send ENABLE to serve it again."),
    (Lifecycle.DELETED, "Cannot restart: the load balancer has been deleted."),
    (Lifecycle.NEW, "Cannot restart: no load balancer is configured; send an UPDATE."),
])
def test_restart_respects_the_desired_state(config_file, capsys, lifecycle, message):
    state_dir = config_file.parent / "state"
    StateStore(state_dir / "state.json").save(DesiredState(lifecycle=lifecycle))
    (state_dir / "haproxy.cfg").write_text("global\n")
    assert cli.main(["ctl", "--config", str(config_file), "restart"]) == ctl.EXIT_FAILED
    assert capsys.readouterr().err == f"libra-worker ctl: {message}\n"
    assert not (state_dir / "haproxy.pid").exists(), "no HAProxy was started"


def test_restart_help_says_it_reloads_haproxy_not_the_worker():
    result = run_ctl_process("ctl", "restart", "--help", capture_output=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Reload HAProxy, not the worker" in text
    assert "Refused while the desired state is SUSPENDED or DELETED" in text


def test_help_documents_exit_codes_and_config_position():
    text = " ".join(run_ctl_process("ctl", "--help", capture_output=True).stdout.split())
    assert "3 (status) the worker daemon is not running" in text
    assert "--config FILE may come before or after the command" in text


def test_a_closed_pipe_is_quiet(config_file):
    """`ctl status | head -1`, with the reader gone before ctl writes a byte."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_ctl_process("ctl", "--config", str(config_file), "status",
                                 stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == ctl.EXIT_FAILED


def test_root_refuses_to_act_on_another_users_state_dir_when_it_cannot_become_that_user(
        config_file, capsys, monkeypatch, tmp_path):
    """(tests/integration/test_faults.py runs the real switch to the owner.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root: hands the state dir to user nobody")
    os.chown(config_file.parent / "state", pwd.getpwnam("nobody").pw_uid, -1)
    monkeypatch.setenv("PATH", str(tmp_path))  # no setpriv to be found
    assert cli.main(["ctl", "--config", str(config_file), "restart"]) == ctl.EXIT_FAILED
    err = capsys.readouterr().err
    assert err == (f"libra-worker ctl: {config_file.parent / 'state'} belongs to nobody and setpriv "
                   "(util-linux) is not installed to act as that user; run ctl as that user instead "
                   "of root.\n")
