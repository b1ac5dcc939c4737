"""The device's dynamic-cookie key: made once, kept, the same for every process that reads it."""

from __future__ import annotations

import stat
import threading

import pytest

from libra_worker.drivers.haproxy import cookie_key
from libra_worker.drivers.haproxy.render import COOKIE_KEY
from libra_worker.errors import WorkerError
from libra_worker.fileutil import create_once


def test_the_first_read_makes_a_private_random_key_and_later_reads_keep_it(tmp_path):
    path = tmp_path / "cookie.key"

    key = cookie_key.load_or_create(path)

    assert COOKIE_KEY.fullmatch(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cookie_key.load_or_create(path) == key == path.read_text().strip()
    assert cookie_key.load_or_create(tmp_path / "other.key") != key  # random per device
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["cookie.key", "other.key"]


def test_processes_starting_together_all_read_the_one_key_stored(tmp_path):
    # The worker and `ctl haproxy-config` on a fresh device: whoever stores first wins.
    path = tmp_path / "cookie.key"
    start = threading.Barrier(8)
    keys: list[str] = []

    def read() -> None:
        start.wait()
        keys.append(cookie_key.load_or_create(path))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(keys) == 8 and set(keys) == {path.read_text().strip()}
    assert [entry.name for entry in tmp_path.iterdir()] == ["cookie.key"]


def test_create_once_never_replaces_a_file(tmp_path):
    path = tmp_path / "cookie.key"
    assert create_once(path, "first\n") is True
    assert create_once(path, "second\n") is False
    assert path.read_text() == "first\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["cookie.key"]


@pytest.mark.parametrize("text", ["", "not hex\n", "ab" * 31 + "\n", "AB" * 32 + "\n"])
def test_a_key_this_worker_did_not_write_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "cookie.key"
    path.write_text(text)

    with pytest.raises(WorkerError, match=r"cookie\.key is not a cookie key \(64 hex digits\)"):
        cookie_key.load_or_create(path)
    assert path.read_text() == text  # left for the operator to look at
