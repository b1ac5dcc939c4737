"""scripts/test.sh hands pytest exactly the arguments given, and CI still runs everything.

The real scripts run in a copy of the repository layout where `scripts/setup.sh`,
`sysctl` and `.venv/bin/python` are stand-ins that record how they were called (the
real set-up reinstalls the shared virtualenv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORD_ARGUMENTS = '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0")" "$@" >> "$RECORD"\n'


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    for script in ("scripts/test.sh", ".ci/run"):
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / script, tmp_path / script)
    for stand_in in ("scripts/setup.sh", ".venv/bin/python", "bin/sysctl"):
        path = tmp_path / stand_in
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RECORD_ARGUMENTS)
        path.chmod(0o755)
    return tmp_path


def run(layout: Path, *command: str) -> list[str]:
    """The recorded calls, each as 'name arg arg ...', of running `command` in `layout`."""
    record = layout / "record"
    env = {**os.environ, "RECORD": str(record), "PATH": f"{layout / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(["bash", *command], cwd=layout / "scripts", env=env, check=True, timeout=30)
    calls, current = [], []
    for line in record.read_text().splitlines():
        if line in ("setup.sh", "python", "sysctl") and current:
            calls.append(" ".join(current))
            current = []
        current.append(line)
    return calls + [" ".join(current)]


def test_arguments_go_to_pytest_exactly(layout):
    calls = run(layout, str(layout / "scripts/test.sh"), "tests/unit", "-q", "-k", "config")
    assert calls[0] == "setup.sh --test"
    assert calls[-1] == "python -m pytest -p no:cacheprovider tests/unit -q -k config"


def test_no_arguments_run_the_whole_suite(layout):
    assert run(layout, str(layout / "scripts/test.sh"))[-1] == "python -m pytest -p no:cacheprovider tests"


def test_ci_runs_the_whole_suite(layout):
    assert run(layout, str(layout / ".ci/run"))[-1] == "python -m pytest -p no:cacheprovider -q -rfEs tests"
