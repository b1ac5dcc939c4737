"""The device's dynamic-cookie key, made once and kept in state_dir.

HAProxy derives each HTTP node's SERVERID cookie from this key and the node's address and
port (`cookie ... dynamic`). A browser stays on its node only while the value stays the
same: across reloads, worker restarts, reboots and upgrades the key must not change, so it
is generated once per device and stored, never derived from anything a reload changes.
It is a secret only in a small way: with it, a client could compute the cookie of any
address:port and ask for that node directly (which a cookie it was given already does).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from libra_worker.drivers.haproxy.render import COOKIE_KEY
from libra_worker.errors import WorkerError
from libra_worker.fileutil import create_once

KEY_BYTES = 32


def load_or_create(path: Path) -> str:
    """The key stored at `path`, created there first (mode 0600) if there is none.

    The worker and `ctl haproxy-config` may both start on a fresh device at once: only one
    key is ever stored, and both read that one.
    """
    if not path.exists():
        create_once(path, secrets.token_hex(KEY_BYTES) + "\n")
    key = path.read_text(encoding="ascii", errors="replace").strip()
    if not COOKIE_KEY.fullmatch(key):
        raise WorkerError(f"{path} is not a cookie key (64 hex digits); remove it and a new "
                          "one is made (each browser is then balanced once more).")
    return key
