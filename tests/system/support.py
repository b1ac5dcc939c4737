"""Helpers for tests under a real systemd (fixtures: tests/system/conftest.py)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from tests.system.sandbox import Sandbox, available

CHECKOUT = Path(__file__).resolve().parents[2]
# Inside the sandbox, where install_service copies the wheelhouse (its /tmp is its own).
WHEELHOUSE_INSIDE = "/var/cache/libra-wheelhouse"


@functools.cache
def _availability() -> tuple[bool, str]:
    return available()


def require_sandbox() -> None:
    """Skip the calling test, with the reason, where no sandbox can be booted."""
    usable, reason = _availability()
    if not usable:
        pytest.skip(f"no systemd sandbox here: {reason}")


def install_service(sandbox: Sandbox, checkout: Path, wheelhouse: Path,
                    timeout: float = 600) -> str:
    """Run scripts/install-service.sh inside `sandbox` as the README says (as root), with
    pip offline on `wheelhouse` (copied in first); its output. Fails on a non-zero exit."""
    inside = sandbox.path(WHEELHOUSE_INSIDE)
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(wheelhouse, inside)
    result = sandbox.run(
        ["bash", str(checkout / "scripts" / "install-service.sh")], check=False,
        timeout=timeout, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE_INSIDE})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr
