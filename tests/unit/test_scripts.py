"""scripts/test.sh hands pytest exactly the arguments given, and CI still runs everything,
from a fresh clone under a private directory, on a path with a blank.

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


def script_env(layout: Path) -> dict[str, str]:
    return {**os.environ, "RECORD": str(layout / "record"),
            "PATH": f"{layout / 'bin'}:{os.environ['PATH']}"}


def commit(layout: Path) -> None:
    """Make the layout a git checkout (.ci/run clones it), the stand-ins committed."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(layout)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "add", "scripts", ".ci", ".venv"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "layout"], check=True, timeout=30)


def run(layout: Path, *command: str) -> list[str]:
    """The recorded calls, each as 'name arg arg ...', of running `command` in `layout`."""
    record = layout / "record"
    subprocess.run(["bash", *command], cwd=layout / "scripts", env=script_env(layout), check=True,
                   timeout=30)
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


def test_ci_runs_the_whole_suite_from_a_clone_under_a_private_path_with_a_blank(layout):
    # The stand-in python also says where it ran and the mode of the directory above.
    where = layout / "where"
    python = layout / ".venv/bin/python"
    python.write_text(python.read_text() + f'printf "%s\\n" "$PWD" "$(stat -c %a "$PWD/..")" > {where}\n')
    commit(layout)

    assert run(layout, str(layout / ".ci/run"))[-1] == "python -m pytest -p no:cacheprovider -q -rfEs tests"

    ran_in, parent_mode = where.read_text().splitlines()
    assert " " in ran_in and parent_mode == "700"
    assert not Path(ran_in).parent.exists(), "the clone was not removed"


def test_ci_exits_with_pytests_status(layout):
    python = layout / ".venv/bin/python"
    python.write_text(python.read_text() + "exit 5\n")  # pytest: no tests collected
    commit(layout)
    result = subprocess.run(["bash", str(layout / ".ci/run")], env=script_env(layout), timeout=30)
    assert result.returncode == 5
