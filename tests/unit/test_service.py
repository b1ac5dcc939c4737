"""Unit tests for libra_worker.service: who the worker runs as, the pidfile, exit codes."""

from __future__ import annotations

import logging
import os
import pwd
import socket
import threading

import pytest

from libra_worker import cli, service
from libra_worker.config import load
from libra_worker.service import EXIT_RUNNING, PidFile, StartupError, resolve_identity
from tests.unit.test_logsetup import settings


def test_an_unknown_user_or_group_is_a_sentence_naming_the_key(tmp_path):
    with pytest.raises(StartupError, match=r"^\[worker\] user 'no-such-user-lw' does not exist"):
        resolve_identity(settings(tmp_path, user="no-such-user-lw"))
    with pytest.raises(StartupError, match=r"^\[worker\] group 'no-such-group-lw' does not exist"):
        resolve_identity(settings(tmp_path, group="no-such-group-lw"))


def test_root_may_run_as_another_user(tmp_path):
    nobody = pwd.getpwnam("nobody")
    identity = resolve_identity(settings(tmp_path, user="nobody"), euid=0)
    assert (identity.name, identity.uid, identity.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)


def test_only_root_may_switch_users(tmp_path):
    with pytest.raises(StartupError, match=r"^\[worker\] user asks to run as root .* only root can switch"):
        resolve_identity(settings(tmp_path, user="root"), euid=pwd.getpwnam("nobody").pw_uid)


def test_no_user_means_the_current_one(tmp_path):
    identity = resolve_identity(settings(tmp_path))
    assert identity.is_current and identity.uid == os.geteuid()


def test_the_pidfile_is_held_and_a_second_holder_gets_exit_3(tmp_path):
    first = PidFile(tmp_path / "worker.pid")
    first.acquire()
    try:
        assert (tmp_path / "worker.pid").read_text() == f"{os.getpid()}\n"
        assert PidFile(tmp_path / "worker.pid").holder() == os.getpid()
        with pytest.raises(StartupError) as error:
            PidFile(tmp_path / "worker.pid").acquire()
        assert error.value.exit_code == EXIT_RUNNING and f"pid {os.getpid()}" in str(error.value)
    finally:
        first.release()
    assert not (tmp_path / "worker.pid").exists()


def test_a_left_over_pidfile_is_not_a_running_worker(tmp_path):
    (tmp_path / "worker.pid").write_text("1\n")
    pidfile = PidFile(tmp_path / "worker.pid")
    assert pidfile.holder() is None
    pidfile.acquire()
    pidfile.release()


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in text and "2 usage or configuration error" in text
    assert "3 another worker already runs" in text


def test_a_missing_config_file_is_exit_2_and_one_line(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "missing.conf"), "--foreground"]) == service.EXIT_CONFIG
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def resolver_failing_with(code: int):
    def getaddrinfo(host, *_args, **_kwargs):
        raise socket.gaierror(code, "resolver says no")

    return getaddrinfo


def test_a_job_server_name_that_does_not_exist_is_refused(monkeypatch, tmp_path):
    # A fake resolver: a real lookup of a made-up name would leave loopback.
    monkeypatch.setattr(socket, "getaddrinfo", resolver_failing_with(socket.EAI_NONAME))
    config = load_config(tmp_path, "[gearman]\nservers = gearmn.example:4730\n")
    with pytest.raises(StartupError, match=r"^\[gearman\] servers: the host 'gearmn.example' is unknown"):
        service.check_job_servers(config)


def test_a_temporary_resolver_failure_is_left_to_the_reconnect_loop(monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "getaddrinfo", resolver_failing_with(socket.EAI_AGAIN))
    service.check_job_servers(load_config(tmp_path, "[gearman]\nservers = gearman.example:4730\n"))


def load_config(tmp_path, text: str):
    path = tmp_path / "worker.conf"
    path.write_text(f"{text}[worker]\nstate_dir = {tmp_path}\n")
    return load(path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")


@needs_root
def test_root_hands_what_it_creates_to_the_service_user(tmp_path):
    nobody = pwd.getpwnam("nobody")
    worker = settings(tmp_path / "state", pid_file=tmp_path / "run" / "w.pid",
                      log_file=tmp_path / "log" / "w.log", user="nobody")
    service.prepare_directories(worker, resolve_identity(worker))
    for path in (tmp_path / "state", tmp_path / "run", tmp_path / "log", tmp_path / "log" / "w.log"):
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o750
    assert tmp_path.stat().st_uid == 0  # existing directories are left alone


@needs_root
def test_a_log_file_planted_as_a_symlink_is_not_followed(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("root's\n")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "w.log").symlink_to(precious)
    worker = settings(tmp_path / "state", log_file=tmp_path / "log" / "w.log", user="nobody")
    with pytest.raises(StartupError, match=r"^\[worker\] log_file .*w\.log: Too many levels of symbolic links"):
        service.prepare_directories(worker, resolve_identity(worker))
    assert precious.stat().st_uid == 0 and precious.read_text() == "root's\n"


def test_an_exception_that_ends_a_thread_goes_to_the_log(caplog):
    previous = threading.excepthook
    service.log_thread_failures()
    try:
        def fail() -> None:
            raise RuntimeError("boom in a timer")

        thread = threading.Thread(target=fail, name="consolidation-timer")
        with caplog.at_level(logging.ERROR, logger="libra_worker"):
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    assert "consolidation-timer stopped on an unexpected error" in caplog.text
    assert "boom in a timer" in caplog.text
