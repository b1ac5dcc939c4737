"""The slow install tests: scripts/install-service.sh, staged and for real.

Marked ``install``. The staged test installs under a temporary root (no apt, no system
user, nothing outside it). The real one needs root (CI runs as root): it installs on
this machine as an operator would, runs it again (an upgrade) and verifies the installed
units with `systemd-analyze verify`. Both install the package's dependencies into the new
virtualenv with pip. The installed service itself is tested under a real systemd, in
tests/system.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[2] / "scripts" / "install-service.sh"
SHIPPED_ETC = INSTALL.parents[1] / "etc"
SERVICE_USER = "libra"
PREFIX = Path("/opt/libra-worker")
CONFIG = Path("/etc/libra-worker/libra-worker.conf")
UNIT_DIR = Path("/etc/systemd/system")
UNITS = ["libra-worker.service", "libra-haproxy.service", "libra-logsink.socket",
         "libra-logsink.service", "libra.target"]
SYSCTL = Path("/etc/sysctl.d/60-libra-worker.conf")
LOGROTATE = Path("/etc/logrotate.d/libra-worker")
STATE_DIR = Path("/var/lib/libra-worker")

pytestmark = pytest.mark.install


def run_install(*arguments: str) -> str:
    result = subprocess.run(["bash", str(INSTALL), *arguments], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_an_older_config_is_given_the_systemd_supervisor(tmp_path: Path) -> None:
    """A config from before the HAProxy and log-sink units would make the worker start a
    second HAProxy beside libra-haproxy.service's."""
    root = tmp_path / "root"
    config = root / CONFIG.relative_to("/")
    config.parent.mkdir(parents=True)
    shipped = (SHIPPED_ETC / "libra-worker.conf").read_text()
    config.write_text(shipped.replace("supervisor = systemd\n", ""))
    output = run_install("--root", str(root))
    assert "added [haproxy] supervisor = systemd" in output
    assert config.read_text().count("supervisor = systemd") == 1
    assert "supervisor = systemd" in config.read_text().split("[haproxy]", 1)[1].split("[", 1)[0]


def test_staged_install_twice_keeps_the_operators_config_and_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = run_install("--root", str(root))
    assert f"staged under {root}" in output
    for installed, shipped in [*((UNIT_DIR / unit, unit) for unit in UNITS),
                               (LOGROTATE, "libra-worker.logrotate"),
                               (SYSCTL, "libra-worker.sysctl"),
                               (CONFIG, "libra-worker.conf")]:
        assert (root / installed.relative_to("/")).read_text() == (SHIPPED_ETC / shipped).read_text()
    assert (root / STATE_DIR.relative_to("/") / "logs").is_dir()
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
    assert "systemctl enable --now libra.target" in installed
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


def test_systemd_analyze_verify_passes_on_the_installed_units(installed: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             *(str(UNIT_DIR / unit) for unit in UNITS)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
