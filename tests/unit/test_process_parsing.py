"""Parsing HAProxy's answers (master CLI `show proc`, stats `show stat`, `-c` output),
plus the small file helpers they rely on (fileutil.atomic_write, state.StateStore)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from libra_worker import fileutil
from libra_worker.drivers.haproxy.process import (
    HAProxyProcess,
    ProcessTable,
    _alerts,
    find_binary,
    process_alive,
)
from libra_worker.drivers.haproxy.sockets import ServerStatus, StatusQuery
from libra_worker.errors import ActionTimeout, ConfigCheckFailed, ReloadFailed, StatsUnavailable
from libra_worker.jobs import JobTimeout
from libra_worker.fileutil import atomic_write
from libra_worker.state import DesiredState, Lifecycle, StateStore
from tests.unit.stand_ins import FakeStatsSocket

# ---------------------------------------------------------------------- show proc (HAProxy 2.6.12)

SHOW_PROC_FRESH = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
6099            master          0 [failed: 0]   0d00h00m16s     2.6.12-1+deb12u4
# workers
6100            worker          0               0d00h00m16s     2.6.12-1+deb12u4
# programs

"""

SHOW_PROC_AFTER_RELOADS = """\
6099            master          3 [failed: 0]   0d00h00m26s     2.6.12-1+deb12u4
# workers
6726            worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
6397            worker          1               0d00h00m05s     2.6.12-1+deb12u4
"""

SHOW_PROC_FAILED_RELOAD = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
6099            master          4 [failed: 1]   0d00h00m31s     2.6.12-1+deb12u4
# workers
6726            worker          0               0d00h00m06s     2.6.12-1+deb12u4
# old workers
6397            worker          1               0d00h00m10s     2.6.12-1+deb12u4
# programs
"""


def test_show_proc_fresh_master():
    assert ProcessTable.parse(SHOW_PROC_FRESH) == ProcessTable(6099, 0, (6100,))


def test_show_proc_without_header_ignores_old_workers():
    table = ProcessTable.parse(SHOW_PROC_AFTER_RELOADS)
    assert table == ProcessTable(master_pid=6099, failed_reloads=0, worker_pids=(6726,))
    assert 6397 not in table.worker_pids


def test_show_proc_failed_reload():
    table = ProcessTable.parse(SHOW_PROC_FAILED_RELOAD)
    assert table == ProcessTable(6099, 1, (6726,))
    before = ProcessTable.parse(SHOW_PROC_AFTER_RELOADS)
    # What reload() compares: same worker, failed count raised.
    assert table.worker_pids == before.worker_pids
    assert table.failed_reloads > before.failed_reloads


def test_show_proc_several_current_workers():
    answer = SHOW_PROC_FRESH.replace(
        "# workers\n", "# workers\n7001            worker          0               0d00h00m01s     2.6.12\n"
    )
    assert ProcessTable.parse(answer).worker_pids == (7001, 6100)


def test_show_proc_master_without_workers():
    answer = "6099            master          1 [failed: 1]   0d00h00m26s     2.6.12\n# workers\n# programs\n"
    assert ProcessTable.parse(answer) == ProcessTable(6099, 1, ())


@pytest.mark.parametrize("answer", [
    "",
    "Unknown command.\n",
    "garbage\n# workers\n6100 worker 0 0d 2.6\n",
    "6099 master 0 0d00h00m16s 2.6.12\n",  # no [failed: n]
    "master 0 [failed: 0]\n",
])
def test_show_proc_garbage(answer):
    with pytest.raises(ReloadFailed, match="Unexpected answer from HAProxy's master"):
        ProcessTable.parse(answer)


def test_show_proc_garbage_is_truncated_in_the_error():
    with pytest.raises(ReloadFailed) as caught:
        ProcessTable.parse("x" * 5000)
    assert len(str(caught.value)) < 300


# ---------------------------------------------------------------------- haproxy -c output

CHECK_OUTPUT = """\
[NOTICE]   (30915) : haproxy version is 2.6.12-1+deb12u4
[NOTICE]   (30915) : path to executable is /usr/sbin/haproxy
[ALERT]    (30915) : config : parsing [/tmp/x.cfg:2] : unknown keyword 'foo' in 'global' section
[ALERT]    (30915) : config : Error(s) found in configuration file : /tmp/x.cfg
[WARNING]  (30915) : config : missing timeouts for frontend 'x'.
"""


def test_alerts_strip_notices_and_pid_prefixes():
    assert _alerts(CHECK_OUTPUT) == (
        "config : parsing [/tmp/x.cfg:2] : unknown keyword 'foo' in 'global' section "
        "config : Error(s) found in configuration file : /tmp/x.cfg "
        "config : missing timeouts for frontend 'x'."
    )


def test_alerts_without_any():
    assert _alerts("") == "no error message was given."
    assert _alerts("[NOTICE]   (1) : haproxy version is 2.6.12\n\n") == "no error message was given."


def test_alerts_keeps_unprefixed_lines():
    assert _alerts("  Configuration file is valid  \n") == "Configuration file is valid"


@pytest.fixture
def haproxy_process(tmp_path) -> HAProxyProcess:
    return HAProxyProcess(
        binary=find_binary(),
        config_file=tmp_path / "haproxy.cfg",
        pid_file=tmp_path / "haproxy.pid",
        master_socket=tmp_path / "master.sock",
        command_timeout=20,
    )


def test_check_accepts_a_valid_config(haproxy_process, tmp_path):
    config = tmp_path / "ok.cfg"
    config.write_text(
        "defaults\n    mode tcp\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n"
        "listen x\n    bind 127.0.0.1:18080\n    server a 127.0.0.2:80\n"
    )
    haproxy_process.check(config)  # does not raise


def test_check_failure_reports_haproxys_words(haproxy_process, tmp_path):
    config = tmp_path / "bad.cfg"
    config.write_text("global\n    foo bar\n")
    with pytest.raises(ConfigCheckFailed) as caught:
        haproxy_process.check(config)
    assert "unknown keyword 'foo' in 'global' section" in str(caught.value)


def test_check_failure_is_config_check_failed(haproxy_process, tmp_path):
    config = tmp_path / "bad.cfg"
    config.write_text("global\n    foo bar\n")
    with pytest.raises(ConfigCheckFailed, match="^HAProxy rejected the configuration: "):
        haproxy_process.check(config)


def _slow_checker(process: HAProxyProcess, directory: Path, pause: int) -> Path:
    """Make `process` check through a wrapper that writes its pid, waits `pause` seconds,
    then runs the real HAProxy: a check still running while `meanwhile` is. Its pid file."""
    pid_file = directory / "checker.pid"
    wrapper = directory / "haproxy-wrapper"
    wrapper.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nsleep {pause}\n"
                       f"exec {find_binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    process.binary = str(wrapper)
    return pid_file


def _checker_pid(pid_file: Path) -> int:
    for _ in range(3000):
        if pid_file.exists() and pid_file.read_text().strip():
            return int(pid_file.read_text())
        time.sleep(0.01)
    raise AssertionError("the check never started")


def test_a_checker_started_before_its_text_names_the_file_in_haproxys_words(haproxy_process,
                                                                            tmp_path):
    config = tmp_path / "haproxy.cfg.new"
    with haproxy_process.checker(config) as checker:
        config.write_text("global\n    foo bar\n")  # the text comes after HAProxy started
        with pytest.raises(ConfigCheckFailed) as caught:
            checker.check(config.read_text())
    assert caught.value.detail.startswith(
        f"HAProxy rejected the configuration: config : parsing [{config}:2] : unknown keyword")
    assert "/dev/stdin" not in caught.value.detail + str(caught.value)


def test_meanwhile_runs_while_haproxy_checks(haproxy_process, tmp_path):
    pid_file = _slow_checker(haproxy_process, tmp_path, pause=1)
    config = tmp_path / "ok.cfg"
    config.write_text("defaults\n    mode tcp\n    timeout client 1s\n    timeout server 1s\n"
                      "    timeout connect 1s\nlisten x\n    bind 127.0.0.1:18080\n")
    seen = []
    with haproxy_process.checker(config) as checker:
        checker.check(config.read_text(),
                      meanwhile=lambda: seen.append(process_alive(_checker_pid(pid_file))))
    assert seen == [True]  # called once, with the check running


def test_meanwhile_raising_stops_the_check(haproxy_process, tmp_path):
    pid_file = _slow_checker(haproxy_process, tmp_path, pause=30)

    def fail() -> None:
        _checker_pid(pid_file)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with haproxy_process.checker(tmp_path / "any.cfg") as checker:
            checker.check("global\n", meanwhile=fail)
    assert not process_alive(int(pid_file.read_text()))  # killed, not left to run on


def test_the_jobs_time_running_out_during_the_check_stops_it(haproxy_process, tmp_path):
    pid_file = _slow_checker(haproxy_process, tmp_path, pause=30)
    haproxy_process.command_timeout = 300  # only the job's own time runs out
    with pytest.raises(ActionTimeout, match="0.5 s timeout"):
        with JobTimeout(0.5, "UPDATE"), haproxy_process.checker(tmp_path / "any.cfg") as checker:
            checker.check("global\n", meanwhile=lambda: _checker_pid(pid_file))
    assert checker.process.returncode == -signal.SIGKILL  # stopped, not waited for


def test_a_checker_never_given_its_text_is_stopped_with_the_block(haproxy_process, tmp_path):
    pid_file = _slow_checker(haproxy_process, tmp_path, pause=30)
    with pytest.raises(RuntimeError, match="rendering failed"):
        with haproxy_process.checker(tmp_path / "any.cfg"):
            _checker_pid(pid_file)
            raise RuntimeError("rendering failed")
    assert not process_alive(int(pid_file.read_text()))


def _standby_pid(process: HAProxyProcess) -> int:
    assert process._standby is not None
    return process._standby[0].pid


VALID_CONFIG = ("defaults\n    mode tcp\n    timeout client 1s\n    timeout server 1s\n"
                "    timeout connect 1s\nlisten x\n    bind 127.0.0.1:18080\n")


def test_the_checker_started_ahead_is_the_next_one_used(haproxy_process, tmp_path):
    haproxy_process.stand_by()
    waiting = _standby_pid(haproxy_process)
    haproxy_process.stand_by()  # one is enough
    assert _standby_pid(haproxy_process) == waiting
    with haproxy_process.checker(tmp_path / "haproxy.cfg") as checker:
        assert checker.process.pid == waiting
        checker.check(VALID_CONFIG)
    assert haproxy_process._standby is None
    with haproxy_process.checker(tmp_path / "haproxy.cfg") as checker:
        assert checker.process.pid != waiting  # none waited: started there and then
        checker.check(VALID_CONFIG)


def test_a_checker_started_ahead_is_not_used_once_haproxy_changed_or_died(haproxy_process,
                                                                          tmp_path):
    binary = tmp_path / "haproxy"
    shutil.copy(find_binary(), binary)
    haproxy_process.binary = str(binary)
    haproxy_process.stand_by()
    upgraded = _standby_pid(haproxy_process)
    os.utime(binary, ns=(0, 0))  # a package upgrade replaces the file
    with haproxy_process.checker(tmp_path / "haproxy.cfg") as checker:
        assert checker.process.pid != upgraded
        checker.check(VALID_CONFIG)
    assert not process_alive(upgraded)

    haproxy_process.stand_by()
    died = _standby_pid(haproxy_process)
    os.kill(died, signal.SIGKILL)
    haproxy_process._standby[0].wait(timeout=30)
    with haproxy_process.checker(tmp_path / "haproxy.cfg") as checker:
        assert checker.process.pid != died
        checker.check(VALID_CONFIG)


def test_a_checker_started_ahead_ends_with_the_worker(tmp_path):
    """Never given a text, it reads the end of the pipe when the worker is gone."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
              "from pathlib import Path\n"
              "from libra_worker.drivers.haproxy.process import HAProxyProcess, find_binary\n"
              f"p = HAProxyProcess(find_binary(), Path({str(tmp_path / 'h.cfg')!r}), "
              f"Path({str(tmp_path / 'h.pid')!r}), Path({str(tmp_path / 'm.sock')!r}))\n"
              "p.stand_by()\nprint(p._standby[0].pid)\n")
    pid = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True, timeout=60).stdout)
    for _ in range(3000):
        if not process_alive(pid):
            break
        time.sleep(0.01)
    assert not process_alive(pid)


def test_find_binary():
    assert os.access(find_binary(), os.X_OK)
    with pytest.raises(ReloadFailed, match="'no-such-haproxy-binary' was not found"):
        find_binary("no-such-haproxy-binary")


# ---------------------------------------------------------------------- show stat over a socket

SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck
lb-http,FRONTEND,,,0,0,9985,0,0,0,0,0,0,,,,,OPEN,,,
lb-http,web1,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0
lb-http,web2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0
lb-http,web3,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,1,1,0
lb-http,web4,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP 1/3,1,1,0
lb-http,web5,0,0,0,0,,0,0,0,,0,,0,0,0,0,no check,1,1,0
lb-http,web6,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN 1/2,1,1,0
lb-http,BACKEND,0,0,0,0,999,0,0,0,0,0,,0,0,0,0,UP,5,4,0
lb-tcp,FRONTEND,,,0,0,9985,0,0,0,0,0,0,,,,,OPEN,,,
lb-tcp,db1,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0
lb-tcp,BACKEND,0,0,0,0,999,0,0,0,0,0,,0,0,0,0,UP,1,1,0

"""


@pytest.fixture
def stats_socket():
    servers: list[FakeStatsSocket] = []

    def _start(answer: str) -> FakeStatsSocket:
        servers.append(FakeStatsSocket(answer))
        return servers[-1]

    yield _start
    for server in servers:
        server.close()


def test_server_statuses(stats_socket):
    fake = stats_socket(SHOW_STAT)
    statuses = StatusQuery(fake.path, timeout=2).statuses()
    assert fake.commands == ["show stat -1 4 -1 no-maint\n"]
    assert statuses == [
        ServerStatus("lb-http", "web1", "UP"),
        ServerStatus("lb-http", "web2", "DOWN"),
        ServerStatus("lb-http", "web3", "MAINT"),
        ServerStatus("lb-http", "web4", "UP 1/3"),
        ServerStatus("lb-http", "web5", "no check"),
        ServerStatus("lb-http", "web6", "DOWN 1/2"),
        ServerStatus("lb-tcp", "db1", "UP"),
    ]
    assert [status.is_up for status in statuses] == [True, False, False, True, True, False, True]


def test_a_status_query_is_asked_when_made_and_read_when_wanted(stats_socket):
    fake = stats_socket(SHOW_STAT)
    query = StatusQuery(fake.path, timeout=2)
    deadline = time.monotonic() + 5
    while not fake.commands and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.commands == ["show stat -1 4 -1 no-maint\n"]  # before statuses() is called
    assert [status.server for status in query.statuses()][:2] == ["web1", "web2"]


def test_server_statuses_unexpected_answer(stats_socket):
    fake = stats_socket("Unknown command. Please enter one of the following commands only :\n")
    with pytest.raises(StatsUnavailable, match="unexpected answer"):
        StatusQuery(fake.path, timeout=2).statuses()


def test_server_statuses_no_socket():
    directory = tempfile.mkdtemp(prefix="lw-")
    try:
        with pytest.raises(StatsUnavailable, match="does not answer"):
            StatusQuery(Path(directory) / "absent.sock", timeout=1).statuses()
    finally:
        shutil.rmtree(directory)


def test_server_statuses_header_only(stats_socket):
    fake = stats_socket("# pxname,svname,status\n\n")
    assert StatusQuery(fake.path, timeout=2).statuses() == []


# ---------------------------------------------------------------------- fileutil.atomic_write


def test_atomic_write_creates_with_mode_0600(tmp_path):
    target = tmp_path / "haproxy.cfg"
    atomic_write(target, "global\n")
    assert target.read_text() == "global\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["haproxy.cfg"]


def test_atomic_write_replaces_content_and_mode(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old content that is longer than the new one")
    target.chmod(0o644)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_other_mode(tmp_path):
    target = tmp_path / "x"
    atomic_write(target, "x", mode=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_atomic_write_failed_rename_leaves_no_temp_file(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()  # os.replace(file, directory) fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        atomic_write(target, "data")
    assert sorted(os.listdir(tmp_path)) == ["occupied"]
    assert (target / "keep").read_text() == "x"


def test_atomic_write_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "haproxy.cfg"
    target.write_text("previous")

    def failing_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileutil.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "next")
    monkeypatch.undo()
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["haproxy.cfg"]


def test_atomic_write_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "file", "x")
    assert os.listdir(tmp_path) == []


def test_a_staged_file_is_durable_beside_its_path_and_in_place_only_once_committed(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    staged = fileutil.StagedFile(target, "new")
    [temporary] = [name for name in os.listdir(tmp_path) if name != "state.json"]
    assert temporary.startswith(".state.json.") and target.read_text() == "old"
    staged.commit()
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(RuntimeError, match="already committed"):
        staged.commit()


def test_a_discarded_staged_file_leaves_nothing_and_leftovers_are_removed(tmp_path):
    target = tmp_path / "state.json"
    fileutil.StagedFile(target, "never committed").discard()
    assert os.listdir(tmp_path) == []
    fileutil.StagedFile(target, "a killed writer's")  # neither committed nor discarded
    fileutil.StagedFile(tmp_path / "other.json", "another file's")
    assert [path.name for path in fileutil.remove_leftovers(target)][0].startswith(".state.json.")
    assert [name[:12] for name in os.listdir(tmp_path)] == [".other.json."]


# ---------------------------------------------------------------------- state.StateStore


def test_state_round_trip(tmp_path):
    store = StateStore(tmp_path / "state.json")
    state = DesiredState(
        lifecycle=Lifecycle.SUSPENDED,
        since="2024-05-06T07:08:09Z",
        loadbalancers=[{"protocol": "HTTP", "port": 80, "nodes": [{"address": "::1", "port": 8080}]}],
    )
    store.save(state)
    assert store.load() == state
    assert json.loads(store.path.read_text())["lifecycle"] == "SUSPENDED"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_a_staged_state_is_saved_only_when_committed(tmp_path):
    store = StateStore(tmp_path / "state.json")
    first = DesiredState(Lifecycle.ACTIVE, "2024-05-06T07:08:09Z", [{"protocol": "TCP"}])
    store.save(first)
    second = first.moved_to(Lifecycle.SUSPENDED)
    with store.staging(second) as staged:
        staged.write()
        assert StateStore(store.path).load() == first  # written, not yet the state
    assert store.load() == first and os.listdir(tmp_path) == ["state.json"]
    with store.staging(second) as staged:
        staged.write()
        staged.commit()
    assert StateStore(store.path).load() == second == store.load()
    assert os.listdir(tmp_path) == ["state.json"]


def test_state_keeps_the_server_slots_and_reads_a_file_without_them(tmp_path):
    store = StateStore(tmp_path / "state.json")
    layout = [["a", ["slot:1", False, "b"], ["slot:2", True, None]]]
    store.save(DesiredState(Lifecycle.ACTIVE, "2024-05-06T07:08:09Z",
                            [{"protocol": "HTTP", "port": 80}], layout=layout))
    assert StateStore(store.path).load().layout == layout
    # A state file of a release without slots: no layout, the driver derives one.
    document = json.loads(store.path.read_text())
    del document["layout"]
    store.path.write_text(json.dumps(document))
    assert StateStore(store.path).load() == DesiredState(
        Lifecycle.ACTIVE, "2024-05-06T07:08:09Z", [{"protocol": "HTTP", "port": 80}])


def test_state_moved_to_changes_lifecycle_and_time(tmp_path):
    store = StateStore(tmp_path / "state.json")
    old = DesiredState(Lifecycle.ACTIVE, "2000-01-01T00:00:00Z", [{"protocol": "TCP"}])
    new = old.moved_to(Lifecycle.DELETED, loadbalancers=[])
    store.save(new)
    loaded = store.load()
    assert loaded.lifecycle is Lifecycle.DELETED
    assert loaded.loadbalancers == []
    assert loaded.since != "2000-01-01T00:00:00Z"


def test_state_missing_file_is_new(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        state = StateStore(tmp_path / "absent.json").load()
    assert state.lifecycle is Lifecycle.NEW
    assert state.loadbalancers == []
    assert caplog.records == []


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[]", b'"ACTIVE"', b'{"lifecycle": "BOGUS", "since": "x"}',
    b'{"since": "x"}', b'{"lifecycle": "ACTIVE"}', b"\xff\xfe",
])
def test_state_corrupt_file_is_new_and_logged(tmp_path, caplog, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="libra_worker.state"):
        state = StateStore(path).load()
    assert state.lifecycle is Lifecycle.NEW
    assert state.loadbalancers == []
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(path) in errors[0].getMessage()


def test_a_master_between_exec_and_pid_file_counts_as_running_for_readers(haproxy_process,
                                                                          monkeypatch):
    # During a reload the pid file is rewritten and the master re-executes itself: for a
    # few milliseconds `is_running` says no. A read-only job beside the reload looks again.
    looks = iter([False, False, True])
    monkeypatch.setattr(haproxy_process, "is_running", lambda: next(looks))
    assert haproxy_process.is_running_beside_reload()

    monkeypatch.setattr(haproxy_process, "is_running", lambda: False)
    assert not haproxy_process.is_running_beside_reload()  # really stopped: says so


def test_a_process_whose_leader_exited_first_is_alive_until_its_last_thread_is_gone():
    """HAProxy's killed workers: the leader turns zombie while a thread still holds the sockets."""
    leader_exits_first = ("import ctypes, threading, time; "
                          "threading.Thread(target=time.sleep, args=(60,)).start(); "
                          "ctypes.CDLL(None).pthread_exit(None)")
    child = subprocess.Popen([sys.executable, "-c", leader_exits_first])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the leader did not exit"
            time.sleep(0.01)
        assert process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_a_master_proven_once_is_still_said_dead_once_it_exits(haproxy_process, tmp_path):
    """`master_pid` remembers the master it proved ours (pid and start time) so that STATS
    reads one /proc file, not three; a master that exits is still seen gone at once."""
    fake_haproxy = tmp_path / "haproxy"
    fake_haproxy.symlink_to(sys.executable)
    master = subprocess.Popen([str(fake_haproxy), "-c", "import time; time.sleep(60)",
                               "-p", str(haproxy_process.pid_file)])
    try:
        haproxy_process.pid_file.write_text(f"{master.pid}\n")
        assert haproxy_process.master_pid() == master.pid  # proven by its command line
        assert haproxy_process.master_pid() == master.pid  # known by its start time
    finally:
        master.kill()
        master.wait()
    assert haproxy_process.master_pid() is None
    assert not haproxy_process.is_running()
