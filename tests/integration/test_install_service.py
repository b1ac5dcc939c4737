"""The slow install tests: scripts/install-service.sh, staged and for real.

Marked ``install``. The staged test installs under a temporary root (no apt, no system
user, nothing outside it). The real one needs root (CI runs as root): it installs on
this machine as an operator would, runs it again (an upgrade), verifies the installed
unit with `systemd-analyze verify`, and runs the unit's ExecStart as the service user
with the unit's capability, as systemd would, against a test gearmand: the worker
answers DISCOVER and serves a load balancer on port 80 with real HTTP traffic.
Both install the package's dependencies into the new virtualenv with pip.
"""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.support import (
    LOOPBACK,
    Gearmand,
    HTTPBackend,
    Worker,
    lb,
    make_temp_dir,
    traffic,
    update,
)

INSTALL = Path(__file__).resolve().parents[2] / "scripts" / "install-service.sh"
SHIPPED_ETC = INSTALL.parents[1] / "etc"
SERVICE_USER = "libra"
PREFIX = Path("/opt/libra-worker")
CONFIG = Path("/etc/libra-worker/libra-worker.conf")
UNIT = Path("/etc/systemd/system/libra-worker.service")
LOGROTATE = Path("/etc/logrotate.d/libra-worker")
STATE_DIR = Path("/var/lib/libra-worker")
# What systemd puts in a system service's environment, plus the unit's Environment=.
SERVICE_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": str(STATE_DIR), "USER": SERVICE_USER, "LOGNAME": SERVICE_USER,
    "SHELL": "/usr/sbin/nologin", "PYTHONDONTWRITEBYTECODE": "1",
}

pytestmark = pytest.mark.install


def run_install(*arguments: str) -> str:
    result = subprocess.run(["bash", str(INSTALL), *arguments], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_staged_install_twice_keeps_the_operators_config_and_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = run_install("--root", str(root))
    assert f"staged under {root}" in output
    for installed, shipped in [(UNIT, "libra-worker.service"),
                               (LOGROTATE, "libra-worker.logrotate"),
                               (CONFIG, "libra-worker.conf")]:
        assert (root / installed.relative_to("/")).read_text() == (SHIPPED_ETC / shipped).read_text()
    assert (root / "opt/libra-worker/share/doc/libra-worker/README.rst").exists()
    config = root / CONFIG.relative_to("/")
    config.write_text(config.read_text() + "# the operator's change\n")
    kept_state = root / STATE_DIR.relative_to("/") / "state.json"
    kept_state.write_text("{}")

    run_install("--root", str(root))
    assert config.read_text().endswith("# the operator's change\n")
    assert config.with_name("libra-worker.conf.dist").read_text() == (
        SHIPPED_ETC / "libra-worker.conf").read_text()
    assert kept_state.read_text() == "{}"
    version = subprocess.run([str(root / "opt/libra-worker/bin/libra-worker"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("libra-worker ")


@pytest.fixture(scope="module")
def installed() -> str:
    """A real install, then a second run over it (an upgrade); the second run's output."""
    if os.geteuid() != 0:
        pytest.skip("the real install needs root (CI runs as root)")
    run_install()
    original = CONFIG.read_text()
    CONFIG.write_text(original + "# the operator's change\n")
    try:
        output = run_install()
        assert CONFIG.read_text() == original + "# the operator's change\n"
    finally:
        CONFIG.write_text(original)
    return output


def test_install_creates_the_service_user_and_says_what_to_run(installed: str) -> None:
    assert "systemctl enable --now libra-worker" in installed
    account = pwd.getpwnam(SERVICE_USER)
    assert (account.pw_dir, account.pw_shell) == (str(STATE_DIR), "/usr/sbin/nologin")
    assert account.pw_gid == grp.getgrnam(SERVICE_USER).gr_gid
    status = CONFIG.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (
        0, account.pw_gid, 0o640)
    assert STATE_DIR.stat().st_uid == account.pw_uid
    assert LOGROTATE.read_text() == (SHIPPED_ETC / "libra-worker.logrotate").read_text()


def test_logrotate_accepts_the_installed_file(installed: str, tmp_path: Path) -> None:
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed")
    # -d: parse and plan only; `su libra libra` needs the user the install created.
    result = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(LOGROTATE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr


def test_systemd_analyze_verify_passes_on_the_installed_unit(installed: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def unit_exec_start() -> list[str]:
    (line,) = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


class ServiceWorker(Worker):
    """The installed worker, started as the unit starts it, on a copy of the installed
    config edited to use this test's job server, directories and loopback."""

    def write_config(self) -> None:
        super().write_config()
        merged = configparser.ConfigParser(interpolation=None)
        merged.read([CONFIG, self.config_path])
        merged["worker"]["pid_file"] = str(self.root / "worker.pid")
        with open(self.config_path, "w") as output:
            merged.write(output)

    def command(self) -> list[str]:
        binary, *arguments = unit_exec_start()
        assert arguments == ["--config", str(CONFIG), "--foreground"]
        return ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}",
                "--init-groups", "--inh-caps=+net_bind_service",
                "--ambient-caps=+net_bind_service",
                binary, "--config", str(self.config_path), "--foreground"]

    def environment(self) -> dict[str, str]:
        return dict(SERVICE_ENVIRONMENT)


def port_80_free() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, 80))
        except OSError:
            return False
    return True


def owner_of(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
    return pwd.getpwuid(int(uid)).pw_name


def test_the_units_exec_start_as_the_service_user_serves_port_80(
        installed: str, gearmand: Gearmand,
        http_backend: Callable[[str], HTTPBackend]) -> None:
    if not port_80_free():
        pytest.skip("port 80 on 127.0.0.1 is taken")
    root = make_temp_dir()
    worker = ServiceWorker(root, [gearmand.address])
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(root, account.pw_uid, account.pw_gid)
    os.chmod(worker.config_path, 0o644)
    try:
        worker.start()
        assert owner_of(worker.process.pid) == SERVICE_USER
        backend = http_backend("node-a")
        reply = worker.submit(update(lb("HTTP", 80, [backend.node()])))
        assert reply["hpcs_response"] == "PASS", reply
        answered, failures = traffic(f"http://{LOOPBACK}:80/", 20)
        assert (answered, failures) == ({"node-a": 20}, 0)
        assert {owner_of(pid) for pid in worker.haproxy.our_pids()} == {SERVICE_USER}
    finally:
        worker.cleanup()
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
