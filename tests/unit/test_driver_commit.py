"""HAProxyDriver.update around its commit point: once state.json holds the UPDATE, nothing
that cuts the job short (its alarm) may put the previous configuration back.

HAProxy's process control is stood in for (nothing starts or reloads); each text is still
proven by the real `haproxy -c`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from libra_worker import config, fileutil
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.errors import ActionTimeout
from libra_worker.messages import parse
from tests.integration.support import free_port


def device(port: int, address: str):
    return parse({"hpcs_action": "UPDATE", "loadbalancers": [
        {"protocol": "HTTP", "port": port, "nodes": [{"address": address, "port": 9001}]},
    ]}).device


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HAProxyDriver]:
    """A driver whose HAProxy is "running" and reloads at once."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    ini = tmp_path / "worker.ini"
    ini.write_text(f"[gearman]\nservers = 127.0.0.1:4730\n[worker]\nstate_dir = {state_dir}\n")
    haproxy_driver = HAProxyDriver(config.load(ini).haproxy)
    monkeypatch.setattr(haproxy_driver.process, "is_running", lambda: True)
    monkeypatch.setattr(haproxy_driver.process, "reload", lambda: None)
    monkeypatch.setattr(haproxy_driver, "_ensure_sink", lambda: None)
    try:
        yield haproxy_driver
    finally:
        waiting = haproxy_driver.process._standing_by()
        if waiting is not None:
            waiting.kill()
            waiting.communicate()


ALARM = ActionTimeout("UPDATE did not finish within its 1 s timeout.")


@pytest.fixture
def serving(driver, monkeypatch) -> tuple[int, list[str | None]]:
    """One UPDATE applied (node 127.0.0.1) on a port; then the record of the previous
    texts put back."""
    port = free_port()
    driver.update(device(port, "127.0.0.1"))
    put_backs: list[str | None] = []
    monkeypatch.setattr(driver, "_put_back", lambda previous, hurry=False: put_backs.append(previous))
    return port, put_backs


def test_an_alarm_in_the_state_files_fsync_leaves_the_committed_update_serving(
        driver, serving, monkeypatch):
    port, put_backs = serving

    def alarm_after_the_rename(_directory: Path) -> None:
        raise ALARM

    monkeypatch.setattr(fileutil, "fsync_directory", alarm_after_the_rename)
    with pytest.raises(ActionTimeout):
        driver.update(device(port, "127.0.0.2"))

    # state.json and the live file agree on the new UPDATE: a restart serves what runs.
    assert put_backs == []
    saved = driver.store.load().loadbalancers
    assert saved[0]["nodes"][0]["address"] == "127.0.0.2"
    live = driver.files.config.read_text()
    assert "127.0.0.2:9001" in live and "127.0.0.1:9001" not in live


def test_an_alarm_before_the_state_file_is_renamed_puts_the_previous_file_back(
        driver, serving, monkeypatch):
    port, put_backs = serving
    rename = fileutil._replace

    def alarm_in_the_rename(temporary: str, path: Path) -> None:
        if path == driver.store.path:
            raise ALARM
        rename(temporary, path)

    monkeypatch.setattr(fileutil, "_replace", alarm_in_the_rename)
    with pytest.raises(ActionTimeout):
        driver.update(device(port, "127.0.0.2"))

    assert len(put_backs) == 1 and "127.0.0.1:9001" in put_backs[0]
    assert driver.store.load().loadbalancers[0]["nodes"][0]["address"] == "127.0.0.1"
