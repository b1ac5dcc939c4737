"""Fixtures for tests under a real systemd: a booted `Sandbox` per test, and the wheels that
let scripts/install-service.sh install the project inside one, where there is no network.

The helpers the tests call (install_service) are in tests/system/support.py. Where a
sandbox cannot be made (not root, no overlayfs...), these tests are skipped with
the reason; they never fail for it. See tests/system/sandbox.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.system.sandbox import Sandbox
from tests.system.support import CHECKOUT, require_sandbox


def sandbox_name(request: pytest.FixtureRequest) -> str:
    """The test's name as a host name (the machine's, in its journal lines)."""
    return ("lw-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-"))[:63]


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A booted machine for this test, destroyed after it, whatever happened. The
    checkout is bound in at its own path: a clone under /tmp (CI's) is otherwise hidden
    by the machine's own /tmp."""
    require_sandbox()
    with Sandbox(sandbox_name(request), shared=[CHECKOUT]) as machine:
        machine.boot()
        yield machine


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    """Wheels of the project, its runtime dependencies and its build requirements, built
    on the host (which reaches the package index) for an offline install inside."""
    require_sandbox()
    directory = Path(tempfile.mkdtemp(prefix="lw-wheels-"))
    source = directory / "source"
    try:
        # From a copy: pip builds in the source tree (build/, *.egg-info).
        shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".tox", "build", "dist", "run", "*.egg-info", "__pycache__"))
        wheels = directory / "wheels"
        # setuptools and wheel: pip builds the checkout in an isolated environment that
        # needs them, from the same wheelhouse.
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
             "--wheel-dir", str(wheels), str(source), "setuptools>=61", "wheel"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        yield wheels
    finally:
        shutil.rmtree(directory, ignore_errors=True)
