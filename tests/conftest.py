"""Fixtures for unit and integration tests alike."""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from tests.integration.support import install_checkout, make_temp_dir


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[str]:
    """A Python that user nobody can run, with this checkout installed: built once for the
    session in a directory of its own, removed afterwards. Tests that use it need root."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs the worker as user nobody")
    directory = make_temp_dir()
    try:
        yield install_checkout(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
