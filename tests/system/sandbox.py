"""A real systemd, booted as PID 1 of namespaces the test makes: a throw-away machine.

The host runs no systemd (CI containers, the test machines), yet the project's units must be
tested under one. `Sandbox` boots /lib/systemd/systemd (``--unit=multi-user.target``) as
PID 1 of new PID, mount, UTS, IPC, network and cgroup namespaces, on a file system of its
own (tests/system/sandbox-init.sh builds it):

- ``/`` is an overlay: the host's root file system read-only below, and an upper layer on a
  tmpfs the harness owns (the machine's "disk": it outlives a poweroff, so ``reboot()`` boots
  again on the same files). Nothing the machine writes or deletes reaches the host.
- ``/proc``, ``/sys`` (read-only), ``/sys/fs/cgroup`` (cgroup2, rooted in a fresh directory
  of the host's unified hierarchy), ``/dev`` (a few bound devices and a devpts of its own),
  ``/run`` and ``/tmp`` are its own; ``/run`` and ``/tmp`` are empty at every boot.
  ``/proc/sys`` is read-only but for ``/proc/sys/net`` (the kernel's other sysctls are the
  host's).
- The network namespace has ``lo`` only: nothing inside reaches anything outside.
- Units the host enables (``/etc/systemd/system/*.wants``, ``*.requires``) and the few
  that cannot work in a container (`EXTRA_MASKED`) are masked at the first boot; the
  project's installed files (`HIDDEN`) are hidden, so every sandbox starts as a machine
  where libra-worker was never installed, whatever the host has.

What a test may rely on: the lower layer is the host's root file system itself, not a
copy. Files that exist on the host when the sandbox boots are visible inside unless the
machine has written over them; later changes on the host may or may not show (overlayfs
leaves that undefined), so a test never changes host files a booted sandbox reads. Only the
root file system is below: the host's other mounts (its /tmp if it were one, /proc, /dev,
/run) are not. Host directories a test needs inside (a pytest tmp dir, a wheelhouse, as
/tmp is the machine's own) are passed as ``shared``: bound read-only at the same path.

Mounts never touch the host's mount table: the tmpfs lives in a mount namespace held by a
small keeper process, and every boot's mounts in the machine's own. The keeper and PID 1
die with the harness's process (PR_SET_PDEATHSIG, ``unshare --kill-child``), so even a
killed pytest leaves no machine running; `destroy` (the context manager's exit, the
fixture's finalizer) kills both by pid, removes the cgroup and the directories.

Commands run inside through ``nsenter -t PID -a``: they are in the machine's namespaces
(but in the host's cgroup, outside the machine's tree), see its file system, reach its
systemd and journal. `popen` starts a long-running helper; stop it by pid
(`Helper.stop`). A poweroff kills whatever is left inside.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from tests.integration.support import wait_until

SYSTEMD = Path("/lib/systemd/systemd")
INIT_SCRIPT = Path(__file__).resolve().with_name("sandbox-init.sh")
CGROUP2 = Path("/sys/fs/cgroup/unified")
HOST_UNITS = Path("/etc/systemd/system")
# Started by the vendor's own wants (not the host's), and useless or failing here.
EXTRA_MASKED = (
    # No console, no ttys: getty.target would wait on gettys that cannot start.
    "console-getty.service", "getty.target",
    # Would try the network (none here) or the host's hardware.
    "systemd-networkd-wait-online.service", "systemd-timesyncd.service",
    "systemd-pstore.service", "e2scrub_reap.service",
)
# What scripts/install-service.sh installs: a host that ran the installer (the install
# tests do, as root) must not make a sandbox look installed already. Its units, and links
# to them, under /etc/systemd/system are hidden too (`hidden_host_paths`).
HIDDEN = (
    "/opt/libra-worker", "/etc/libra-worker", "/var/lib/libra-worker", "/var/log/libra-worker",
    "/etc/logrotate.d/libra-worker",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    """The sandbox could not be made, booted or stopped as asked."""


def available() -> tuple[bool, str]:
    """Whether this machine can boot a sandbox: (True, "") or (False, why not)."""
    if os.geteuid() != 0:
        return False, "needs root (mount, namespaces, cgroups)"
    for tool in ("unshare", "nsenter", "setpriv", "mount"):
        if shutil.which(tool, path=PATH) is None:
            return False, f"{tool} (util-linux) is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return False, f"no systemd binary at {SYSTEMD}"
    filesystems = Path("/proc/filesystems").read_text()
    for fs in ("overlay", "cgroup2", "tmpfs", "devpts"):
        if f"\t{fs}\n" not in filesystems:
            return False, f"the kernel has no {fs} file system"
    if not (CGROUP2 / "cgroup.procs").exists():
        return False, f"no cgroup2 hierarchy mounted at {CGROUP2}"
    if Path("/run/systemd/system").is_dir():
        # A real systemd already runs: its own tools (systemd-nspawn) are the better fit,
        # and its cgroup tree is not ours to add to.
        return False, "a systemd already runs on this host"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--net", "--cgroup", "--propagation",
         "private", "--", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return False, f"cannot make namespaces and mount in them: {probe.stderr.strip()}"
    return True, ""


def host_enabled_units() -> list[str]:
    """Units the host enables (masked in every sandbox), but the project's own."""
    return sorted(link.name for pattern in ("*.wants", "*.requires")
                  for directory in HOST_UNITS.glob(pattern) for link in directory.iterdir()
                  if not link.name.startswith("libra-"))


def hidden_host_paths() -> list[str]:
    """Host paths no sandbox sees: `HIDDEN`, and the project's units and links to them."""
    units = [*HOST_UNITS.glob("libra*"), *HOST_UNITS.glob("*/libra*")]
    return sorted({*HIDDEN, *map(str, units)})


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the child dies when the harness does.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Helper:
    """A long-running process inside the sandbox (`Sandbox.popen`).

    `popen` is nsenter on the host (its pipes are the helper's); `pid` is the helper's own
    host pid, the one `stop` signals: nsenter does not pass signals on.
    """

    popen: subprocess.Popen
    pid: int

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> int:
        """Signal the helper, wait for it (SIGKILL after `timeout`); its exit status."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout)


class Sandbox:
    """One throw-away machine: `boot`, run commands in it, `poweroff`/`reboot`, `destroy`.

    ``shared`` host directories are bound read-only inside at the same path; ``mask`` adds
    unit names to mask at the first boot. Use it as a context manager (or call `destroy`):
    nothing is left behind, booted or not.
    """

    def __init__(self, name: str, *, shared: Sequence[os.PathLike | str] = (),
                 mask: Sequence[str] = ()) -> None:
        self.name = name
        self.shared = [Path(path).resolve() for path in shared]
        self.directory = Path(tempfile.mkdtemp(prefix="lw-sbx-"))
        self.console_log = self.directory / "console.log"
        self._disk = self.directory / "disk"
        self._root = self.directory / "root"
        self._cgroup = CGROUP2 / f"libra-sandbox-{self.directory.name}"
        self._extra_mask = list(mask)
        self._keeper: subprocess.Popen | None = None
        self._init: subprocess.Popen | None = None
        self._pid: int | None = None
        self._boots = 0
        self.boot_seconds: float | None = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    @property
    def pid(self) -> int:
        """Host pid of the machine's PID 1 (systemd)."""
        if self._pid is None or self._init is None or self._init.poll() is not None:
            raise SandboxError(f"sandbox {self.name} is not running")
        return self._pid

    @property
    def running(self) -> bool:
        return self._init is not None and self._init.poll() is None

    # -- life cycle ---------------------------------------------------------------------

    def boot(self, timeout: float = 60) -> str:
        """Boot and wait until the system is up; "running" or "degraded" (failed units are
        printed for diagnosis). The first boot prepares the disk; later ones reuse it."""
        if self.running:
            raise SandboxError(f"sandbox {self.name} is already running")
        if self._keeper is None:
            self._start_keeper()
            self._prepare_disk()
        self._cgroup.mkdir(exist_ok=True)
        started = time.monotonic()
        self._pid = None
        with open(self.console_log, "ab") as console:
            console.write(f"--- boot {self._boots + 1}\n".encode())
            console.flush()
            self._init = subprocess.Popen(
                ["nsenter", "-t", str(self._keeper.pid), "-m", "--",
                 "bash", str(INIT_SCRIPT), "outer", str(self._cgroup), str(self._disk),
                 str(self._root), self.name, *map(str, self.shared)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
        self._boots += 1
        self._pid = wait_until(self._find_pid1, timeout, f"PID 1 of sandbox {self.name}")
        state = self._wait_running(started + timeout)
        self.boot_seconds = time.monotonic() - started
        if state == "degraded":
            failed = self.systemctl("--failed", "--no-legend", "--plain", check=False).stdout
            print(f"sandbox {self.name} is degraded; failed units:\n{failed}")
        return state

    def poweroff(self, timeout: float = 60) -> None:
        """Clean shutdown (SIGRTMIN+4 to PID 1, as systemd-nspawn does); wait for it."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGRTMIN + 4)
        try:
            self._init.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_machine()
            raise SandboxError(f"sandbox {self.name} did not power off in {timeout:g} s "
                               f"(killed; see {self.console_log})") from None
        self._pid = None

    def reboot(self, timeout: float = 60) -> str:
        """Power off and boot again on the same disk; the new state, as `boot`."""
        self.poweroff(timeout)
        return self.boot(timeout)

    def destroy(self) -> None:
        """Kill what is left (PID 1: the kernel kills the rest of its PID namespace; the
        keeper: its mount namespace and the disk go), remove the cgroup and directories."""
        self._kill_machine()
        if self._keeper is not None:
            if self._keeper.poll() is None:
                self._keeper.kill()
            self._keeper.wait()
            self._keeper = None
        if self._cgroup.exists():
            wait_until(self._remove_cgroup, 10, f"cgroup {self._cgroup} to empty")
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- commands inside ----------------------------------------------------------------

    def command(self, args: Sequence[str], *, user: str | None = None,
                cwd: str | None = None) -> list[str]:
        """The host argument list that runs `args` inside (as `user` if given)."""
        prefix = ["nsenter", "-t", str(self.pid), "-a", "--"]
        if user is not None:
            # setpriv rather than runuser/su: no PAM, so no logind session to set up.
            prefix += ["setpriv", f"--reuid={user}", f"--regid={self._primary_group(user)}",
                       "--init-groups", "--"]
        if cwd is not None:
            # Not nsenter's --wd: it opens the directory before entering, on the host.
            prefix += ["env", f"--chdir={cwd}", "--"]
        return [*prefix, *args]

    def environment(self, env: Mapping[str, str] | None = None,
                    user: str | None = None) -> dict[str, str]:
        """The environment of a command inside: a clean one (the host's is not the
        machine's), `user`'s HOME, then `env`."""
        name = user or "root"
        home = self.run(["getent", "passwd", name]).stdout.split(":")[5] if user else "/root"
        base = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                "HOME": home, "USER": name, "LOGNAME": name}
        base.update(env or {})
        return base

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None, env: Mapping[str, str] | None = None,
            user: str | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run `args` inside and wait; text output captured. `check` raises with it."""
        result = subprocess.run(
            self.command(args, user=user, cwd=cwd), input=input, capture_output=True,
            text=True, timeout=timeout, env=self.environment(env, user),
            stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SandboxError(f"in sandbox {self.name}: {list(args)} exited "
                               f"{result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def popen(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
              user: str | None = None, cwd: str | None = None,
              stdout: int | IO[Any] | None = subprocess.DEVNULL,
              stderr: int | IO[Any] | None = subprocess.STDOUT,
              timeout: float = 10) -> Helper:
        """Start a long-running helper inside; stop it with `Helper.stop` (by pid)."""
        process = subprocess.Popen(
            self.command(args, user=user, cwd=cwd), stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, env=self.environment(env, user), preexec_fn=_die_with_parent)
        try:
            # nsenter forks once to enter the PID namespace: its child is the helper.
            pid = wait_until(lambda: _children(process.pid) or process.poll() is not None,
                            timeout, f"helper {args[0]} to start")
        except AssertionError:
            process.kill()
            process.wait()
            raise
        if pid is True:
            raise SandboxError(f"helper {list(args)} exited at once ({process.returncode})")
        return Helper(process, pid[0])

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def journal_cursor(self) -> str:
        """The journal's current end: pass it to `journal` for what comes after."""
        output = self.run(["journalctl", "--quiet", "--lines=0", "--show-cursor"]).stdout
        return output.strip().removeprefix("-- cursor: ")

    def journal_entries(self, unit: str | None = None,
                        since_cursor: str | None = None) -> list[dict[str, Any]]:
        """The journal's entries (journalctl's JSON fields), of `unit` if given (its own
        lines and systemd's about it, as ``journalctl -u``), after `since_cursor` if given."""
        # What journald has received is on its files once --sync returns.
        self.run(["journalctl", "--sync"])
        args = ["journalctl", "--no-pager", "--output=json"]
        if since_cursor is not None:
            args.append(f"--after-cursor={since_cursor}")
        # journalctl 252 combining -u with --after-cursor misses entries now and then
        # (measured): the unit is matched here instead.
        entries = [json.loads(line) for line in self.run(args).stdout.splitlines()]
        return [entry for entry in entries if unit is None or unit in (
            entry.get("_SYSTEMD_UNIT"), entry.get("UNIT"), entry.get("OBJECT_SYSTEMD_UNIT"))]

    def journal(self, unit: str | None = None, since_cursor: str | None = None) -> str:
        """`journal_entries` as text, one line per entry, like journalctl's short-precise."""
        lines = []
        for entry in self.journal_entries(unit, since_cursor):
            when = datetime.fromtimestamp(int(entry["__REALTIME_TIMESTAMP"]) / 1e6)
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):  # not UTF-8: journalctl gives the bytes
                message = bytes(message).decode(errors="replace")
            lines.append(f"{when:%b %d %H:%M:%S.%f} {entry.get('_HOSTNAME', '')} "
                         f"{entry.get('SYSLOG_IDENTIFIER', entry.get('_COMM', ''))}"
                         f"[{entry.get('_PID', '')}]: {message}\n")
        return "".join(lines)

    def path(self, path: str | os.PathLike) -> Path:
        """The host's way into the running machine's file system (/proc/PID/root)."""
        inside = Path(path)
        if not inside.is_absolute():
            raise ValueError(f"a path inside the sandbox is absolute: {inside}")
        return Path(f"/proc/{self.pid}/root") / inside.relative_to("/")

    def write_file(self, path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
        """Write `text` to `path` inside (root-owned, parents made), replacing it atomically."""
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        candidate = target.with_name(f".{target.name}.new")
        candidate.write_text(text)
        candidate.chmod(mode)
        os.replace(candidate, target)

    def read_file(self, path: str | os.PathLike) -> str:
        return self.path(path).read_text()

    # -- internals ----------------------------------------------------------------------

    def _primary_group(self, user: str) -> str:
        return self.run(["id", "-g", user]).stdout.strip()

    def _start_keeper(self) -> None:
        self._disk.mkdir()
        self._root.mkdir()
        # The disk is mounted in a mount namespace of its own, held by this process: the
        # host's mount table never shows it, and it goes when the keeper goes.
        self._keeper = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount -t tmpfs -o mode=0755,size=2g tmpfs "$1" && echo ready && exec sleep infinity',
             "keeper", str(self._disk)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            preexec_fn=_die_with_parent)
        if self._keeper.stdout.readline().strip() != "ready":
            raise SandboxError(f"could not mount the sandbox's disk at {self._disk}")

    def _prepare_disk(self) -> None:
        # Written straight into the upper layer, before any overlay is mounted on it.
        disk = Path(f"/proc/{self._keeper.pid}/root") / self._disk.relative_to("/")
        upper = disk / "upper"
        (disk / "work").mkdir()
        units = upper / HOST_UNITS.relative_to("/")
        units.mkdir(parents=True)
        for name in sorted(set(host_enabled_units()) | set(EXTRA_MASKED)
                           | set(self._extra_mask)):
            (units / name).symlink_to("/dev/null")
        for hidden in hidden_host_paths():
            whiteout = upper / hidden.lstrip("/")
            whiteout.parent.mkdir(parents=True, exist_ok=True)
            # A character device 0/0 in the upper layer is overlayfs's whiteout.
            os.mknod(whiteout, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        (upper / "etc/hostname").write_text(f"{self.name}\n")
        # Its own machine id: its own journal directory, not the host's.
        (upper / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")

    def _find_pid1(self) -> int | bool:
        if self._init.poll() is not None:
            raise SandboxError(f"sandbox {self.name} did not start (exit "
                               f"{self._init.returncode}):\n{self._console_tail()}")
        # nsenter (no PID namespace to enter: no fork) and bash exec into unshare, whose
        # one child is the namespace's PID 1.
        children = _children(self._init.pid)
        return children[0] if children else False

    def _wait_running(self, deadline: float) -> str:
        while True:
            if not self.running:
                raise SandboxError(f"sandbox {self.name} stopped while booting:\n"
                                   f"{self._console_tail()}")
            remaining = deadline - time.monotonic()
            state = self.systemctl("is-system-running", "--wait", check=False,
                                   timeout=max(remaining, 1)).stdout.strip()
            if state in ("running", "degraded"):
                return state
            # Before systemd listens, is-system-running says "offline" or fails at once.
            if time.monotonic() >= deadline:
                raise SandboxError(f"sandbox {self.name} did not come up: {state!r}\n"
                                   f"{self._console_tail()}")
            time.sleep(0.05)

    def _kill_machine(self) -> None:
        if self._init is None:
            return
        if self._init.poll() is None:
            if self._pid is not None:
                os.kill(self._pid, signal.SIGKILL)
            else:
                self._init.kill()
        self._init.wait()
        self._init = None
        self._pid = None

    def _remove_cgroup(self) -> bool:
        # Deepest first: rmdir of a cgroup fails while it has children or processes.
        for directory in sorted((path for path in self._cgroup.rglob("*") if path.is_dir()),
                                key=lambda path: len(path.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                return False
        try:
            self._cgroup.rmdir()
        except OSError:
            return False
        return True

    def _console_tail(self, lines: int = 30) -> str:
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
