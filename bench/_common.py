"""Shared pieces of the libra-worker benchmarks: real processes, a raw Gearman client,
statistics, machine facts and result files.

Everything listens on loopback (127.0.0.x) on ports in 20000-32000 that were test-bound
first. Every process is started and stopped by pid: gearmand and the worker are our
children; HAProxy and the log sink daemonize, so they are found through their pidfiles
(and, for HAProxy, the /proc cmdlines that name our pidfile). Temp dirs come from
``tempfile.mkdtemp(prefix="lwb-")`` and only those are deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "docs" / "bench"
GEARMAND = "/usr/sbin/gearmand"
PORT_RANGE = (20000, 32000)
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL = 0.02

_handed_out: set[tuple[str, int]] = set()


# --------------------------------------------------------------------------- basics


def free_port(host: str = LOOPBACK) -> int:
    """A port in 20000-32000 on `host` that binds now and was not handed out before."""
    for _ in range(1000):
        port = random.randint(*PORT_RANGE)
        if (host, port) in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add((host, port))
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]} on {host}")


def make_temp_dir() -> Path:
    """Short path on purpose: unix socket paths inside it must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="lwb-"))


def remove_temp_dir(path: Path) -> None:
    """Delete a dir this bench created (and only such a dir)."""
    if path.name.startswith("lwb-") and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def pids_naming(argument: str, program: str = "haproxy") -> list[int]:
    """Live processes of `program` whose command line contains `argument` (e.g. our pidfile)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            args = cmdline(pid)
            if args and program in Path(args[0]).name and argument in args and process_alive(pid):
                found.append(pid)
    return sorted(found)


def signal_pids(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def stop_haproxy_by_pidfile(pid_file: Path) -> None:
    """Stop every HAProxy started with `pid_file`: soft stop, then SIGKILL, all by pid."""
    pids = pids_naming(str(pid_file))
    if not pids:
        return
    signal_pids(pids, signal.SIGUSR1)
    if not wait_gone(pids, 3.0):
        signal_pids([pid for pid in pids if process_alive(pid)], signal.SIGKILL)
        wait_gone(pids, STOP_TIMEOUT)


def stop_child(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); with few samples p99 is near the max."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(value: float, floor: float) -> float:
    return value / floor if floor else float("nan")


# --------------------------------------------------------------------------- gearman


class Gearmand:
    """One gearmand in the foreground, our child, stopped by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "Gearmand":
        config = self.root / "gearmand.conf"
        config.touch()  # gearmand refuses to start without its config file
        command = [
            GEARMAND, "--listen", LOOPBACK, "--port", str(self.port),
            "--threads", "1", "--queue-type", "builtin",
            "--log-file", str(self.root / "gearmand.log"),
            "--pid-file", str(self.root / "gearmand.pid"),
            "--config-file", str(config),
        ]
        with open(self.root / "gearmand.out", "ab") as output:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.process.poll() is not None or port_accepts(LOOPBACK, self.port),
                       START_TIMEOUT, "gearmand")
            if self.process.poll() is not None:
                raise RuntimeError("gearmand exited: " + (self.root / "gearmand.out").read_text())
        except BaseException:
            self.stop()
            raise
        return self

    def workers_for(self, function: str) -> int:
        """Available workers for `function`, from the text admin protocol's `status`."""
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as conn:
            conn.sendall(b"status\n")
            data = b""
            deadline = time.monotonic() + 5
            while not data.endswith(b".\n") and time.monotonic() < deadline:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.decode().splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] == function:
                return int(parts[3])
        return 0

    def stop(self) -> None:
        stop_child(self.process)


# Binary protocol packet types (http://gearman.org/protocol/).
CAN_DO, PRE_SLEEP, NOOP, SUBMIT_JOB, JOB_CREATED = 1, 4, 6, 7, 8
NO_JOB, WORK_STATUS, WORK_COMPLETE, WORK_FAIL, ERROR = 10, 12, 13, 14, 19
WORK_EXCEPTION, WORK_DATA, WORK_WARNING, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ = 25, 28, 29, 30, 31
_HEADER = struct.Struct(">4sII")


def pack(kind: int, *arguments: bytes) -> bytes:
    body = b"\0".join(arguments)
    return _HEADER.pack(b"\0REQ", kind, len(body)) + body


class PacketReader:
    """Reads whole binary-protocol packets from a blocking socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = self.conn.recv(max(65536, size - len(self.buffer)))
            if not chunk:
                raise ConnectionError("the job server closed the connection")
            self.buffer += chunk

    def read(self) -> tuple[int, bytes]:
        self._fill(_HEADER.size)
        magic, kind, length = _HEADER.unpack_from(self.buffer)
        if magic != b"\0RES":
            raise ConnectionError(f"bad packet magic {magic!r}")
        self._fill(_HEADER.size + length)
        body = self.buffer[_HEADER.size:_HEADER.size + length]
        self.buffer = self.buffer[_HEADER.size + length:]
        return kind, body


class RawClient:
    """A Gearman client on one kept-open TCP connection: SUBMIT_JOB, wait for the result."""

    def __init__(self, address: str, timeout: float = 120.0) -> None:
        host, _, port = address.rpartition(":")
        self.conn = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = PacketReader(self.conn)

    def submit(self, function: str, payload: bytes) -> bytes:
        self.conn.sendall(pack(SUBMIT_JOB, function.encode(), uuid.uuid4().hex.encode(), payload))
        while True:
            kind, body = self.reader.read()
            if kind == WORK_COMPLETE:
                return body.split(b"\0", 1)[1]
            if kind in (WORK_FAIL, WORK_EXCEPTION, ERROR):
                raise RuntimeError(f"job failed: packet {kind} {body[:200]!r}")
            # JOB_CREATED, WORK_DATA, WORK_STATUS, WORK_WARNING: keep waiting.

    def submit_json(self, function: str, message: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.submit(function, json.dumps(message).encode()))

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- the worker


class Worker:
    """The real libra-worker (`python -m libra_worker.cli --foreground`) as our child."""

    def __init__(self, root: Path, gearmand: Gearmand, log_level: str = "INFO") -> None:
        self.root = root
        self.state_dir = root / "state"
        self.gearmand = gearmand
        self.function = f"lwb-{uuid.uuid4().hex[:8]}"
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def haproxy_pid_file(self) -> Path:
        return self.state_dir / "haproxy.pid"

    @property
    def master_socket(self) -> Path:
        return self.state_dir / "haproxy-master.sock"

    def start(self) -> "Worker":
        config = self.root / "worker.ini"
        config.write_text(
            "[gearman]\n"
            f"servers = {self.gearmand.address}\n"
            f"function = {self.function}\n"
            "poll_timeout = 2\n"
            "[worker]\n"
            f"state_dir = {self.state_dir}\n"
            f"log_file = {self.root / 'worker.log'}\n"
            f"log_level = {self.log_level}\n"
            "[haproxy]\n"
            f"bind_address = {LOOPBACK}\n"
            "command_timeout = 60\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.root / "worker.out", "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "libra_worker.cli", "--config", str(config), "--foreground"],
                cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(lambda: self.process.poll() is not None
                       or self.gearmand.workers_for(self.function) > 0,
                       START_TIMEOUT, "the worker to register with gearmand", interval=0.05)
            if self.process.poll() is not None:
                raise RuntimeError("the worker exited: " + (self.root / "worker.out").read_text())
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def haproxy_worker_pids(self) -> tuple[int, ...]:
        """The current HAProxy worker pids, from the master CLI's `show proc`."""
        answer = master_command(self.master_socket, "show proc")
        current = answer.split("# workers", 1)[-1].split("#", 1)[0]
        return tuple(int(line.split()[0]) for line in current.splitlines()
                     if " worker " in f" {line} ")

    def stop(self) -> None:
        """Worker first (SIGTERM by pid), then its HAProxy and log sink, by their pidfiles."""
        stop_child(self.process)
        stop_haproxy_by_pidfile(self.haproxy_pid_file)
        stop_log_sink(self.state_dir)


def stop_log_sink(state_dir: Path) -> None:
    pid_file = state_dir / "logs" / "logsink.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if "libra_worker.logsink" not in " ".join(cmdline(pid)):
        return
    signal_pids([pid], signal.SIGTERM)
    if not wait_gone([pid], 5.0):
        signal_pids([pid], signal.SIGKILL)
        wait_gone([pid], 5.0)


def master_command(path: Path, command: str, timeout: float = 10.0) -> str:
    """One command on HAProxy's master CLI; the answer is everything up to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(command.encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def render_config(message: dict[str, Any], state_dir: Path, log_socket: Path) -> str:
    """The exact text the worker renders for `message`, with sockets under `state_dir`."""
    from libra_worker.drivers.haproxy import render
    from libra_worker.messages import parse_device

    device = parse_device({"loadbalancers": message["loadbalancers"]})
    paths = render.RuntimePaths(state_dir / "haproxy-stats.sock", log_socket)
    context = render.build_context(device, listen_address=LOOPBACK, paths=paths, maxconn=4096)
    return render.render(render.template_environment(), context)


# --------------------------------------------------------------------------- reporting


def _run_text(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "haproxy": (_run_text(["haproxy", "-v"]).splitlines() or ["unknown"])[0],
        "gearmand": _run_text([GEARMAND, "--version"]),
        "python": platform.python_version(),
    }


def machine_lines(info: dict[str, str]) -> list[str]:
    return [
        f"- Date: {info['date']}",
        f"- Machine: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}",
        f"- {info['haproxy']}",
        f"- gearmand {info['gearmand'].replace('gearmand ', '')}, Python {info['python']}",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), separator, *(line(row) for row in cells)])


def write_results(name: str, title: str, sections: Sequence[str], info: dict[str, str],
                  out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    text = "\n\n".join([f"# {title}", "\n".join(machine_lines(info)), *sections]) + "\n"
    path.write_text(text)
    return path


def pyplot_or_none(required: bool) -> Any:
    """matplotlib's pyplot (Agg), or None when it is missing and `required` is False."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise SystemExit("matplotlib is needed for the plot: pip install matplotlib "
                             "(or pass --no-plot)")
        print("matplotlib is missing: no plot written (pip install matplotlib)")
        return None
    return plt


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds == seconds else "n/a"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value == value else "n/a"
