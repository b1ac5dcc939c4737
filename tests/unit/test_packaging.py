"""The sdist and wheel carry what an install needs: templates, etc/ files, the README.

Built for real with `python -m build` (the wheel from the sdist, as pip would), without
network: setuptools and wheel come from the test environment.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from libra_worker import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ETC = ["libra-worker.conf", "libra-worker.service", "libra-worker.logrotate",
               "logging.conf"]
# scripts/install-service.sh creates the virtualenv here.
PREFIX = "/opt/libra-worker"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    # A copy: building writes build/ and *.egg-info next to the sources.
    shutil.copytree(REPO_ROOT, source, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", "run"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                    "--outdir", str(out), str(source)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    return out


def sdist_names(dist: Path) -> set[str]:
    (archive,) = dist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def wheel_names(dist: Path) -> set[str]:
    (archive,) = dist.glob("*.whl")
    with zipfile.ZipFile(archive) as wheel:
        return set(wheel.namelist())


def test_sdist_carries_templates_etc_and_the_build_declaration(dist: Path) -> None:
    names = sdist_names(dist)
    assert {"templates/haproxy.cfg.j2", "pyproject.toml", "setup.py", "README.rst",
            "scripts/install-service.sh"} <= names
    assert {f"etc/{name}" for name in SHIPPED_ETC} <= names


def test_wheel_built_from_the_sdist_carries_them_inside_the_package(dist: Path) -> None:
    names = wheel_names(dist)
    assert "libra_worker/templates/haproxy.cfg.j2" in names
    assert {f"libra_worker/etc/{name}" for name in SHIPPED_ETC} <= names


def test_the_units_documentation_is_a_file_the_wheel_installs(dist: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO_ROOT / "etc" / "libra-worker.service")
    documentation = unit["Unit"]["Documentation"]
    assert documentation.startswith(f"file://{PREFIX}/")
    installed = documentation.removeprefix(f"file://{PREFIX}/")
    assert f"libra_worker-{__version__}.data/data/{installed}" in wheel_names(dist)
