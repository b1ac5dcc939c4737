"""Shared pieces of the libra-worker benchmarks: real processes, a raw Gearman client,
statistics, machine facts and result files.

Everything listens on loopback (127.0.0.x) on ports in 20000-32000 that were test-bound
first. Every process is started and stopped by pid: gearmand and the worker are our
children; HAProxy and the log sink daemonize, so they are stopped the way the worker
itself stops them (``HAProxyProcess.stop()`` through the pidfile and the /proc cmdlines
naming it, ``LogSink.stop()`` through its pidfile). Temp dirs come from
``tempfile.mkdtemp(prefix="lwb-")`` and only those are deleted.

What the project already has is imported, not copied: process and socket helpers from
``libra_worker.drivers.haproxy``, and gearmand, polling and child handling from
``tests.integration.support`` (the integration tests' real-component helpers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from libra_worker.drivers.haproxy.process import (  # noqa: E402
    HAProxyProcess,
    ProcessTable,
    find_binary,
    process_alive,
    process_cmdline,
)
from libra_worker.drivers.haproxy.sockets import send_command  # noqa: E402
from libra_worker.errors import WorkerError  # noqa: E402
from libra_worker.logsink import LogSink  # noqa: E402
from tests.integration import support  # noqa: E402
from tests.integration.support import (  # noqa: E402
    GEARMAND,
    LOOPBACK,
    PORT_RANGE,
    START_TIMEOUT,
    Gearmand,
    port_accepts,
    rss_kib,
    stop_child,
    wait_until,
)

__all__ = [  # re-exported for the bench scripts
    "Gearmand", "LOOPBACK", "LogSink", "ProcessTable", "START_TIMEOUT", "WorkerError",
    "port_accepts", "process_alive", "process_cmdline", "send_command", "stop_child",
    "wait_until",
]

RESULTS_DIR = REPO / "docs" / "bench"
HAPROXY_STOP_GRACE = 3.0


# --------------------------------------------------------------------------- basics


def free_port(host: str = LOOPBACK) -> int:
    """A port in 20000-32000 that binds now on `host` and was not handed out before.

    The integration support's `free_port` (127.0.0.1, never the same port twice); for the
    traffic bench's backends on 127.0.0.2-4 the port must also bind on that address.
    """
    for _ in range(100):
        port = support.free_port()
        if host == LOOPBACK or _binds(host, port):
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]} on {host}")


def _binds(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def make_temp_dir() -> Path:
    """Short path on purpose: unix socket paths inside it must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="lwb-"))


def remove_temp_dir(path: Path) -> None:
    """Delete a dir this bench created (and only such a dir)."""
    if path.name.startswith("lwb-") and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def haproxy_handle(pid_file: Path, config_file: Path | None = None,
            master_socket: Path | None = None) -> HAProxyProcess:
    """The worker's own HAProxy handle for the processes started with `pid_file`.

    `our_pids()` matches every process whose command line names that pidfile (daemon-mode
    HAProxies included), and `stop()` soft-stops the pid in the pidfile, then SIGKILLs any
    other process still naming it, all by pid. For a daemon-mode HAProxy there is no master
    socket; the default path is never created, and `stop()` only unlinks it if present.
    """
    return HAProxyProcess(
        find_binary(),
        config_file or pid_file.with_name("haproxy.cfg"),
        pid_file,
        master_socket or pid_file.with_name("unused-master.sock"),
        stop_grace=HAPROXY_STOP_GRACE,
    )


def has_workers(gearmand: Gearmand, function: str) -> bool:
    """Whether gearmand lists at least one available worker for `function`."""
    return gearmand.function_status(function)[2] > 0


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
    """A Gearman client on one kept-open TCP (or TLS) connection: SUBMIT_JOB, wait for the result."""

    def __init__(self, address: str, timeout: float = 120.0, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.conn = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.conn = tls.wrap_socket(self.conn, server_hostname=host)
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

    stop = close  # so that a `Run` can own it like the processes


# --------------------------------------------------------------------------- the worker


class Worker:
    """The real libra-worker (`python -m libra_worker.cli --foreground`) as our child."""

    def __init__(self, root: Path, gearmand: Gearmand, log_level: str = "INFO",
                 servers: str | None = None, gearman_options: dict[str, str] | None = None,
                 bind_address: str = LOOPBACK, more_config: str = "") -> None:
        self.root = root
        self.more_config = more_config  # whole INI sections, e.g. "[archive]\ntimeout = 5\n"
        # Each device of a fleet listens on its own loopback address, as real devices do.
        self.bind_address = bind_address
        self.state_dir = root / "state"
        self.gearmand = gearmand
        # A worker that reaches `gearmand` another way (through a TLS terminator).
        self.servers = servers or gearmand.address
        self.gearman_options = dict(gearman_options or {})
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
            f"servers = {self.servers}\n"
            f"function = {self.function}\n"
            "poll_timeout = 2\n"
            + "".join(f"{key} = {value}\n" for key, value in self.gearman_options.items()) +
            "[worker]\n"
            f"state_dir = {self.state_dir}\n"
            f"log_file = {self.root / 'worker.log'}\n"
            f"log_level = {self.log_level}\n"
            "[haproxy]\n"
            f"bind_address = {self.bind_address}\n"
            # Its own peers port: benches of other checkouts may run beside this one.
            f"peers_address = {LOOPBACK}:{free_port()}\n"
            "command_timeout = 60\n"
            + self.more_config
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
                       or has_workers(self.gearmand, self.function),
                       START_TIMEOUT, "the worker to register with gearmand")
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

    @property
    def haproxy(self) -> HAProxyProcess:
        return haproxy_handle(self.haproxy_pid_file, self.state_dir / "haproxy.cfg",
                              self.master_socket)

    def haproxy_worker_pids(self) -> tuple[int, ...]:
        """The current HAProxy worker pids, from the master CLI's `show proc`."""
        return ProcessTable.parse(send_command(self.master_socket, "show proc", 10.0)).worker_pids

    def stop(self) -> None:
        """Worker first (SIGTERM by pid), then its HAProxy and log sink, as the worker would."""
        try:
            stop_child(self.process)
        finally:
            try:
                self.haproxy.stop()
            finally:
                LogSink(self.state_dir).stop()


def configure_http_lb(client: RawClient, worker: Worker, nodes: int = 2) -> None:
    """One HTTP load balancer on the worker (nodes that need not listen), so STATS has data."""
    members = [{"id": f"n{i}", "address": LOOPBACK, "port": free_port()} for i in range(nodes)]
    answer = client.submit_json(worker.function, {
        "hpcs_action": "UPDATE",
        "loadbalancers": [{"protocol": "HTTP", "port": free_port(), "nodes": members}],
    })
    if answer.get("hpcs_response") != "PASS":
        raise RuntimeError(f"UPDATE failed: {answer}")


def render_config(message: dict[str, Any], state_dir: Path, log_socket: Path) -> str:
    """The exact text the worker renders for `message`, with sockets under `state_dir`."""
    from libra_worker.config import HAProxySettings
    from libra_worker.drivers.haproxy import cookie_key, render
    from libra_worker.drivers.haproxy.driver import StateDirLayout
    from libra_worker.messages import parse_device

    device = parse_device({"loadbalancers": message["loadbalancers"]})
    paths = render.RuntimePaths(state_dir / "haproxy-stats.sock", log_socket)
    defaults = HAProxySettings(state_dir=state_dir)
    persistence = render.Persistence(
        defaults.http_cookie_persistence, defaults.tcp_source_persistence, defaults.peers_address,
        cookie_key.load_or_create(StateDirLayout(state_dir).cookie_key))
    context = render.build_context(device, listen_address=LOOPBACK, paths=paths, maxconn=4096,
                                   persistence=persistence)
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


def save_figure(plt: Any, figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------- one run


class BusyLoop:
    """A Python process spinning on this process's CPUs: the neighbour of a slow machine."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "BusyLoop":
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                        stdin=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def add_busy_core_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--busy-core", type=int, metavar="CPU",
                        help="run everything on this CPU beside a busy loop (a slow machine)")


def busy_core(run: "Run", cpu: int) -> None:
    """Play a slow machine: this process and everything it starts from now on run on `cpu`
    only, beside a Python busy loop, until the run ends. Call it before starting anything:
    a process inherits its parent's CPUs when it starts."""
    os.sched_setaffinity(0, {cpu})
    run.own(BusyLoop().start())


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The options every bench takes (`--out-dir`, `--no-plot`); the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    return parser


class Run(contextlib.ExitStack):
    """One bench run: its temp dir, and everything started in it, stopped in reverse order.

    `with Run() as run:` makes the dir; `run.own(thing)` registers `thing.stop` (or `stop`)
    so that leaving the block stops it even when the measurement failed, the last started
    first, and deletes the dir last.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = make_temp_dir()
        self.callback(remove_temp_dir, self.root)

    def own(self, thing: Any, stop: Callable[[], Any] | None = None) -> Any:
        self.callback(stop or thing.stop)
        return thing


def publish(args: argparse.Namespace, name: str, title: str, sections: Sequence[str],
            info: dict[str, str], image_text: str,
            plot: Callable[[Any, Path], None] | None = None) -> None:
    """Write docs/bench/<name>.md (and <name>.png unless --no-plot) into --out-dir; the
    page shows the plot only when there is one."""
    plt = None if args.no_plot else pyplot_or_none(required=True)
    plotted = plt is not None and plot is not None
    image = [f"![{image_text}]({name}.png)"] if plotted else []
    write_results(name, title, [*sections, *image], info, args.out_dir)
    if plotted:
        plot(plt, args.out_dir / f"{name}.png")
    print(f"Results in {args.out_dir / f'{name}.md'}")
