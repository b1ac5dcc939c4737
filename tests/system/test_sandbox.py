"""The sandbox harness itself, under its real systemd: it boots clean, runs units and
their journal, is cut off from the network, reboots on the same disk, applies the worker
unit's hardening, installs the project offline, and leaves nothing on the host."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest

from tests.integration.support import wait_until
from tests.system.sandbox import (
    CGROUP2,
    EXTRA_MASKED,
    Sandbox,
    hidden_host_paths,
    host_enabled_units,
)
from tests.system.support import CHECKOUT, install_service, require_sandbox

SHIPPED_UNIT = CHECKOUT / "etc" / "libra-worker.service"
# The worker unit's [Service] keys that start the worker itself or need its user.
NOT_HARDENING = ("Type", "NotifyAccess", "WatchdogSec", "ExecStart", "ExecReload", "User",
                 "Group")


def load_states(sandbox: Sandbox, units: list[str]) -> dict[str, str]:
    output = sandbox.systemctl("show", "--property=Id,LoadState", *units).stdout
    states = {}
    for block in output.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines())
        states[fields["Id"]] = fields["LoadState"]
    return states


def test_boots_running_with_host_units_masked(sandbox: Sandbox) -> None:
    assert sandbox.systemctl("is-system-running").stdout.strip() == "running"
    assert sandbox.systemctl("--failed", "--no-legend", "--plain").stdout == ""
    masked = sorted({*host_enabled_units(), *EXTRA_MASKED})
    assert load_states(sandbox, masked) == {unit: "masked" for unit in masked}
    assert sandbox.run(["hostname"]).stdout.strip() == sandbox.name
    assert sandbox.run(["systemd-detect-virt", "--container"]).stdout.strip() == "container-other"
    for hidden in hidden_host_paths():
        assert not os.path.lexists(sandbox.path(hidden)), hidden
    # Kernel-wide sysctls stay the host's; the network namespace's own are writable.
    assert sandbox.run(["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"], check=False).returncode
    sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=80"])


def test_a_unit_runs_and_its_output_is_in_the_journal(sandbox: Sandbox) -> None:
    cursor = sandbox.journal_cursor()
    sandbox.write_file("/etc/systemd/system/lw-probe.service", (
        "[Service]\nType=simple\n"
        "ExecStart=/bin/sh -c 'echo lw-probe says hello; exec sleep 300'\n"))
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "lw-probe.service")
    assert sandbox.systemctl("is-active", "lw-probe.service").stdout.strip() == "active"
    main_pid = int(sandbox.systemctl("show", "--value", "--property=MainPID",
                                     "lw-probe.service").stdout)
    assert sandbox.read_file(f"/proc/{main_pid}/comm").strip() == "sleep"
    wait_until(lambda: "lw-probe says hello" in sandbox.journal("lw-probe.service", cursor),
               10, "the unit's line in its journal")
    sandbox.systemctl("stop", "lw-probe.service")
    assert sandbox.systemctl("is-active", "lw-probe.service", check=False).stdout.strip() \
        == "inactive"


def test_only_loopback_inside(sandbox: Sandbox) -> None:
    links = sandbox.run(["ip", "-o", "link", "show"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert sorted(os.listdir(sandbox.path("/sys/class/net"))) == ["lo"]
    assert sandbox.run(["ip", "route", "show"]).stdout == ""


def test_commands_and_helpers_inside(sandbox: Sandbox, tmp_path: Path) -> None:
    assert sandbox.run(["id", "-un"], user="nobody").stdout.strip() == "nobody"
    assert sandbox.run(["cat"], input="through stdin").stdout == "through stdin"
    assert sandbox.run(["pwd"], cwd="/etc").stdout.strip() == "/etc"
    assert sandbox.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    helper = sandbox.popen(["sleep", "300"], user="nobody")
    status = Path(f"/proc/{helper.pid}/status").read_text()
    assert re.search(r"^Uid:\s+65534\s", status, re.M)
    # Its own PID namespace's pid inside, its host pid outside.
    assert re.search(r"^NSpid:\s+\d+\s+\d+$", status, re.M)
    assert helper.stop() == -signal.SIGTERM
    assert not Path(f"/proc/{helper.pid}").exists()


def test_shared_directories_are_read_only_inside(tmp_path: Path) -> None:
    require_sandbox()
    (tmp_path / "given").write_text("from the host\n")
    with Sandbox("lw-shared", shared=[tmp_path]) as machine:
        machine.boot()
        assert machine.run(["cat", str(tmp_path / "given")]).stdout == "from the host\n"
        refused = machine.run(["touch", str(tmp_path / "written")], check=False)
        assert "Read-only file system" in refused.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["given"]


def test_reboot_keeps_the_disk_and_empties_run_and_tmp(sandbox: Sandbox) -> None:
    for path in ("/var/lib/lw-probe/kept", "/run/lw-probe", "/tmp/lw-probe"):
        sandbox.write_file(path, "before the reboot\n")
    first_pid = sandbox.pid
    assert sandbox.reboot() == "running"
    assert sandbox.pid != first_pid
    assert sandbox.read_file("/var/lib/lw-probe/kept") == "before the reboot\n"
    assert not sandbox.path("/run/lw-probe").exists()
    assert not sandbox.path("/tmp/lw-probe").exists()


def test_nothing_reaches_the_host_and_destroy_leaves_nothing() -> None:
    require_sandbox()
    marker = Path(tempfile.mkstemp(prefix="lw-host-marker-", dir="/tmp")[1])
    try:
        machine = Sandbox("lw-destroy")
        with machine:
            machine.boot()
            pids = [machine.pid, machine._keeper.pid]
            # The machine's /tmp is its own: the host's files are neither seen nor cleaned.
            assert machine.run(["test", "-e", str(marker)], check=False).returncode == 1
            machine.run(["systemd-tmpfiles", "--clean", "--remove"])
            machine.write_file("/etc/lw-probe", "inside only\n")
            assert machine.directory.as_posix() not in Path("/proc/self/mountinfo").read_text()
            machine.poweroff()
            assert not machine.running
        assert marker.exists()
        assert not Path("/etc/lw-probe").exists()
        assert machine.directory.as_posix() not in Path("/proc/self/mountinfo").read_text()
        assert not machine.directory.exists()
        assert not any(CGROUP2.glob(f"*{machine.directory.name}*"))
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), pid
    finally:
        marker.unlink()


def test_destroy_kills_a_running_machine() -> None:
    require_sandbox()
    with Sandbox("lw-kill") as machine:
        machine.boot()
        helper = machine.popen(["sleep", "300"])
        pids = [machine.pid, machine._keeper.pid, helper.pid]
    for pid in pids:
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"pid {pid} to go")
    helper.popen.wait(10)
    assert not machine.directory.exists()


def test_the_worker_units_hardening_applies(sandbox: Sandbox) -> None:
    # The shipped unit's sandboxing, on a shell instead of the worker (whose user and
    # config the machine does not have): systemd must apply every option here.
    section = SHIPPED_UNIT.read_text().split("[Service]")[1].split("[Install]")[0]
    hardening = [line for line in section.splitlines()
                 if line and not line.startswith("#") and line.split("=")[0] not in NOT_HARDENING]
    probe = ("ls /proc | grep -c '^[0-9]'; grep -E '^(CapEff|NoNewPrivs|Seccomp):' "
             "/proc/self/status; touch /etc/lw-probe 2>&1; stat -c dev=%d:%i /dev; ls /dev; "
             "exec sleep 300")
    sandbox.write_file("/etc/systemd/system/lw-hardened.service", "\n".join([
        "[Service]", "Type=exec", "User=nobody", "Group=nogroup",
        f"ExecStart=/bin/sh -c \"{probe}\"", *hardening]) + "\n")
    cursor = sandbox.journal_cursor()
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "lw-hardened.service")
    # The probe's lines end with `ls /dev`'s, "zero" last; systemd's own lines are there too.
    lines = wait_until(lambda: "zero" in (text := [
        entry["MESSAGE"] for entry in sandbox.journal_entries("lw-hardened.service", cursor)])
        and text, 10, "the probe's output")
    # ProtectProc=invisible: the shell sees its own processes only (itself, ls, grep).
    assert [int(line) for line in lines if line.isdigit()] <= [3], lines
    assert "CapEff:\t0000000000000400" in lines  # CAP_NET_BIND_SERVICE alone
    assert "NoNewPrivs:\t1" in lines
    assert "Seccomp:\t2" in lines  # SystemCallFilter= is a seccomp filter
    assert any("Read-only file system" in line for line in lines)  # ProtectSystem=strict
    # PrivateDevices=yes: a /dev of its own, not the machine's.
    assert sandbox.run(["stat", "-c", "dev=%d:%i", "/dev"]).stdout.strip() not in lines
    assert "null" in lines and any(line.startswith("dev=") for line in lines)
    assert sandbox.systemctl("is-active", "lw-hardened.service").stdout.strip() == "active"


@pytest.mark.install
def test_install_service_offline_and_the_unit_verifies(sandbox: Sandbox,
                                                       wheelhouse: Path) -> None:
    output = install_service(sandbox, CHECKOUT, wheelhouse)
    # The packages come from the host (the lower layer): no apt run, which would need
    # the network.
    assert "install-service: installing" not in output, output
    assert "installed in /opt/libra-worker" in output, output
    assert sandbox.run(["/opt/libra-worker/bin/libra-worker", "--version"]).stdout.strip()
    verify = sandbox.run(["systemd-analyze", "verify",
                          "/etc/systemd/system/libra-worker.service"], check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stdout + verify.stderr
    assert sandbox.systemctl("show", "--value", "--property=LoadState",
                             "libra-worker.service").stdout.strip() == "loaded"
