"""The shipped systemd units as systemd itself judges them, and as the worker reads them.

`systemd-analyze` works on the files offline (no running systemd needed). `verify`
checks that every Exec command is executable: before an install, the lines that name the
virtualenv are pointed at this environment's `libra-worker`; the tests under a real
systemd (tests/system) run the installed units unchanged.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libra_worker.config import load
from libra_worker.drivers.haproxy.driver import StateDirLayout
from libra_worker.logsink import LogSink

REPO_ROOT = Path(__file__).resolve().parents[2]
ETC = REPO_ROOT / "etc"
SERVICES = ["libra-worker.service", "libra-haproxy.service", "libra-logsink.service"]
UNITS = [*SERVICES, "libra-logsink.socket", "libra.target"]
EXPOSURE_TARGET = 2.0
# The figures docs/operations.rst states ("The units").
DOCUMENTED_EXPOSURE = {"libra-worker.service": 1.5, "libra-haproxy.service": 1.5,
                       "libra-logsink.service": 0.6}
VENV_BINARY = "/opt/libra-worker/bin/libra-worker"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def unit_settings(name: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in (ETC / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match[1])


@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_security_exposure_is_at_most_the_target_and_as_documented(name: str) -> None:
    figure = exposure(ETC / name)
    assert figure <= EXPOSURE_TARGET
    assert figure == DOCUMENTED_EXPOSURE[name]
    assert f"``{name}`` {figure}" in (REPO_ROOT / "docs" / "operations.rst").read_text()


@needs_systemd_analyze
def test_verify_prints_nothing(tmp_path: Path) -> None:
    here = Path(sys.executable).parent / "libra-worker"
    assert here.exists(), "the test environment has no libra-worker script"
    for name in UNITS:
        (tmp_path / name).write_text((ETC / name).read_text().replace(VENV_BINARY, str(here)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             *(str(tmp_path / name) for name in UNITS)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_runs_as_the_service_user_in_the_shared_state_dir(name: str) -> None:
    settings = unit_settings(name)
    assert settings["User"] == settings["Group"] == ["libra"]
    assert settings["StateDirectory"] == ["libra-worker"]
    assert settings["PartOf"] == ["libra.target"]
    assert settings["NoNewPrivileges"] == ["yes"]
    # Nothing but the low-port capability, and only where something binds.
    assert settings["CapabilityBoundingSet"] in (["CAP_NET_BIND_SERVICE"], [""])
    assert settings.get("AmbientCapabilities", [""]) == settings["CapabilityBoundingSet"]


def test_the_worker_unit_is_the_agent_alone() -> None:
    settings = unit_settings("libra-worker.service")
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == [
        f"{VENV_BINARY} --config /etc/libra-worker/libra-worker.conf --foreground"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["RuntimeDirectory"] == ["libra-worker"]
    assert settings["KillMode"] == ["mixed"]
    # A bad config exits 2: restarting cannot help, so the unit fails at once.
    assert settings["Restart"] == ["on-failure"]
    assert "2" in settings["RestartPreventExitStatus"][0].split()


def test_haproxy_and_the_sink_restart_whatever_ends_them() -> None:
    for name in ("libra-haproxy.service", "libra-logsink.service"):
        assert unit_settings(name)["Restart"] == ["always"]


def test_the_units_name_the_files_the_shipped_config_makes_the_worker_use() -> None:
    """libra-haproxy.service and libra-logsink.socket spell out paths the worker derives
    from `[worker] state_dir`; the shipped config and the units must agree."""
    config = load(ETC / "libra-worker.conf")
    assert config.haproxy.supervised_by_systemd
    files = StateDirLayout(config.worker.state_dir)
    (exec_start,) = unit_settings("libra-haproxy.service")["ExecStart"]
    arguments = exec_start.split()
    assert arguments[:2] == ["/usr/sbin/haproxy", "-Ws"]
    assert arguments[arguments.index("-f") + 1] == str(files.config)
    assert arguments[arguments.index("-p") + 1] == str(files.pid_file)
    assert arguments[arguments.index("-S") + 1] == f"{files.master_socket},mode,600"
    assert unit_settings("libra-logsink.socket")["ListenDatagram"] == [
        str(LogSink(config.worker.state_dir).socket_path)]
    assert config.worker.pid_file.parent == Path("/run/libra-worker")
    assert config.worker.log_file is None  # the journal


def test_the_target_pulls_in_every_unit_and_each_service_is_part_of_it() -> None:
    target = configparser.ConfigParser(strict=False, interpolation=None)
    target.read(ETC / "libra.target")
    assert set(target.get("Unit", "Wants").split()) == {
        "libra-worker.service", "libra-haproxy.service", "libra-logsink.socket",
        "libra-logsink.service"}
    assert target.get("Install", "WantedBy") == "multi-user.target"
