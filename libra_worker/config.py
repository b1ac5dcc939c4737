"""The worker's INI configuration, read once into a typed object.

Only `[worker] state_dir` has no sensible default; every other option is optional.
See etc/libra-worker.conf for the documented reference.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from libra_worker.errors import quoted
from libra_worker.messages import DEFAULT_MAX_MESSAGE_BYTES, Action


DEFAULT_GEARMAN_PORT = 4730
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = "haproxy-master.sock"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad value."""


@dataclass(frozen=True)
class HAProxySettings:
    state_dir: Path
    bind_address: str = "0.0.0.0"
    binary: str = "haproxy"
    maxconn: int = 4096
    command_timeout: float = 30.0
    stop_grace: float = 5.0
    reload_attempts: int = 3
    reload_retry_wait: float = 1.0
    template_dir: Path | None = None
    log_max_bytes: int = 64 * 1024 * 1024
    archive_timeout: float = 15.0
    # Where ARCHIVE may upload: host names or URL prefixes; empty means any host.
    archive_allowed_endpoints: tuple[str, ...] = ()
    archive_allow_plain_http: bool = False


@dataclass(frozen=True)
class GearmanSettings:
    servers: tuple[tuple[str, int], ...]
    function: str
    poll_timeout: float = 2.0
    reconnect_delay_max: float = 2.0


@dataclass(frozen=True)
class WorkerSettings:
    state_dir: Path
    pid_file: Path
    log_file: Path | None
    log_level: str
    logging_config: Path | None
    user: str | None
    group: str | None
    umask: int
    journal_entries: int = 1000
    reconcile_interval: float = 1.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class TimeoutSettings:
    """Seconds each action may take before its job is answered FAIL (TIMEOUT)."""

    default: float = 120.0
    per_action: dict[Action, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    gearman: GearmanSettings
    worker: WorkerSettings
    haproxy: HAProxySettings
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port, ...`; IPv6 as `[::1]:4730`, or bare `::1` for the default port."""
    servers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (rest or str(DEFAULT_GEARMAN_PORT))
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:  # a host name, an IPv4 address, or a bare IPv6 address: no port given
            host, port = item, str(DEFAULT_GEARMAN_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"[gearman] servers: {item!r} is not host:port.")
        servers.append((host, int(port)))
    if not servers:
        raise ConfigError("[gearman] servers must name at least one job server.")
    return tuple(servers)


def load(path: Path) -> Config:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"Cannot read the configuration file {path}: {exc.strerror}.") from None
    except configparser.Error as exc:
        raise ConfigError(f"Cannot parse {path}: {exc}") from None
    try:
        return _build(parser)
    except (ValueError, configparser.Error) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _build(parser: configparser.ConfigParser) -> Config:
    state_dir_text = parser.get("worker", "state_dir", fallback="").strip()
    if not state_dir_text:
        raise ConfigError("[worker] state_dir is required.")
    state_dir = Path(state_dir_text).expanduser().absolute()
    if len(str(state_dir / _LONGEST_SOCKET_NAME)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"[worker] state_dir {state_dir} is too long for the unix sockets kept in it "
            f"(at most {_MAX_SOCKET_PATH - len(_LONGEST_SOCKET_NAME) - 1} characters)."
        )
    gearman = GearmanSettings(
        servers=parse_servers(parser.get("gearman", "servers", fallback="127.0.0.1:4730")),
        function=parser.get("gearman", "function", fallback="").strip() or socket.gethostname(),
        poll_timeout=parser.getfloat("gearman", "poll_timeout", fallback=2.0),
        reconnect_delay_max=parser.getfloat("gearman", "reconnect_delay_max", fallback=2.0),
    )
    worker = WorkerSettings(
        state_dir=state_dir,
        pid_file=_path(parser.get("worker", "pid_file", fallback="")) or state_dir / "worker.pid",
        log_file=_path(parser.get("worker", "log_file", fallback="")),
        log_level=parser.get("worker", "log_level", fallback="INFO").strip().upper(),
        logging_config=_path(parser.get("worker", "logging_config", fallback="")),
        user=parser.get("worker", "user", fallback="").strip() or None,
        group=parser.get("worker", "group", fallback="").strip() or None,
        umask=int(parser.get("worker", "umask", fallback="022"), 8),
        journal_entries=parser.getint("worker", "journal_entries", fallback=1000),
        reconcile_interval=parser.getfloat("worker", "reconcile_interval", fallback=1.0),
        max_message_bytes=parser.getint(
            "worker", "max_message_bytes", fallback=DEFAULT_MAX_MESSAGE_BYTES
        ),
    )
    defaults = HAProxySettings(state_dir=state_dir)
    haproxy = HAProxySettings(
        state_dir=state_dir,
        bind_address=parser.get("haproxy", "bind_address", fallback=defaults.bind_address).strip(),
        binary=parser.get("haproxy", "binary", fallback=defaults.binary).strip(),
        maxconn=parser.getint("haproxy", "maxconn", fallback=defaults.maxconn),
        command_timeout=parser.getfloat("haproxy", "command_timeout", fallback=defaults.command_timeout),
        stop_grace=parser.getfloat("haproxy", "stop_grace", fallback=defaults.stop_grace),
        reload_attempts=parser.getint("haproxy", "reload_attempts", fallback=defaults.reload_attempts),
        reload_retry_wait=parser.getfloat(
            "haproxy", "reload_retry_wait", fallback=defaults.reload_retry_wait
        ),
        template_dir=_path(parser.get("haproxy", "template_dir", fallback="")),
        log_max_bytes=parser.getint("archive", "log_max_bytes", fallback=defaults.log_max_bytes),
        archive_timeout=parser.getfloat("archive", "timeout", fallback=defaults.archive_timeout),
        archive_allowed_endpoints=_allowed_endpoints(
            parser.get("archive", "allowed_endpoints", fallback="")
        ),
        archive_allow_plain_http=parser.getboolean("archive", "allow_plain_http", fallback=False),
    )
    _check_bind_address(haproxy.bind_address)
    if worker.max_message_bytes < 1024:
        raise ConfigError("[worker] max_message_bytes must be at least 1024.")
    return Config(gearman=gearman, worker=worker, haproxy=haproxy, timeouts=_timeouts(parser))


def _timeouts(parser: configparser.ConfigParser) -> TimeoutSettings:
    default = parser.getfloat("timeouts", "default", fallback=TimeoutSettings.default)
    per_action = {}
    for action in Action:
        value = parser.getfloat("timeouts", action.value.lower(), fallback=None)
        if value is not None:
            per_action[action] = value
    for value in [default, *per_action.values()]:
        if value <= 0:
            raise ConfigError("[timeouts] values must be positive numbers of seconds.")
    return TimeoutSettings(default=default, per_action=per_action)


def _allowed_endpoints(text: str) -> tuple[str, ...]:
    """Comma- or blank-separated host names and http(s) URL prefixes."""
    entries = tuple(entry for entry in re.split(r"[\s,]+", text.strip()) if entry)
    for entry in entries:
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"[archive] allowed_endpoints: {quoted(entry)} is not an http(s) URL prefix."
                )
        elif not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", entry):
            raise ConfigError(
                f"[archive] allowed_endpoints: {quoted(entry)} is not a host name."
            )
    return entries


def _path(text: str) -> Path | None:
    text = text.strip()
    return Path(text).expanduser().absolute() if text else None


def _check_bind_address(address: str) -> None:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"[haproxy] bind_address {address!r} is not an IP address.") from None
    if getattr(parsed, "scope_id", None) is not None:
        raise ConfigError(f"[haproxy] bind_address {address!r} must not carry an IPv6 zone.")
