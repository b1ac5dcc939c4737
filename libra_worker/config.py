"""The worker's INI configuration, read once into a typed object.

Only `[worker] state_dir` has no sensible default; every other option is optional.
See etc/libra-worker.conf for the documented reference. Loading is strict: a section or
option the loader does not read is refused with a did-you-mean (see `StrictParser`), and
every error names its `[section] option`.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import logging
import math
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from libra_worker.errors import quoted
from libra_worker.messages import DEFAULT_MAX_MESSAGE_BYTES, Action


DEFAULT_GEARMAN_PORT = 4730
# Where HAProxy hands TCP stick tables to its next process at a reload. Loopback, above
# the privileged ports (the service user binds it), below the ephemeral range (no
# outgoing connection of the host is ever given it), and no port a load balancer
# usually serves.
DEFAULT_PEERS_ADDRESS = ("127.0.0.1", 7441)
GEARMAN_STATUS_NAME = "gearman.status"
# `[haproxy] supervisor`: "worker" starts HAProxy and the log sink itself; "systemd" leaves
# them to the units etc/libra-haproxy.service and etc/libra-logsink.socket.
SUPERVISORS = ("worker", "systemd")
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = "haproxy-master.sock"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad value."""


_SHORT_VALUE = 40


def short_text(text: str, limit: int = _SHORT_VALUE) -> str:
    """At most `limit` characters of a value we did not write, for an error sentence."""
    return text if len(text) <= limit else text[:limit] + "..."


class StrictParser(configparser.ConfigParser):
    """A ConfigParser that remembers every (section, option) the loader asks for.

    The options the worker knows are exactly the ones `_build` reads, so a new option
    needs no second list: read it in `_build` (always, not only under some condition)
    with `get`/`getint`/`getfloat`/`getboolean` and it is accepted. Anything in the file
    that was never asked for is refused by `refuse_unknown`, with a did-you-mean.

    The typed getters name the option in their errors and take optional bounds:
    `at_least=` (inclusive) and `positive=True` (greater than zero).
    """

    def __init__(self) -> None:
        super().__init__(inline_comment_prefixes=(";", "#"))
        self.asked: set[tuple[str, str]] = set()

    def get(self, section: str, option: str, **kwargs: Any) -> Any:  # type: ignore[override]
        self.asked.add((section, self.optionxform(option)))
        try:
            return super().get(section, option, **kwargs)
        except configparser.InterpolationError:
            raw = super().get(section, option, raw=True)
            raise ConfigError(
                f"[{section}] {option}: {quoted(raw)} has a lone '%' (write '%%' for one)."
            ) from None

    def getint(self, section: str, option: str, *, at_least: int | None = None,  # type: ignore[override]
               **kwargs: Any) -> Any:
        return self._typed(super().getint, "a whole number", section, option, kwargs,
                           at_least=at_least)

    def getfloat(self, section: str, option: str, *, at_least: float | None = None,  # type: ignore[override]
                 positive: bool = False, **kwargs: Any) -> Any:
        return self._typed(super().getfloat, "a number", section, option, kwargs,
                           at_least=at_least, positive=positive)

    def getboolean(self, section: str, option: str, **kwargs: Any) -> Any:  # type: ignore[override]
        return self._typed(super().getboolean, "true or false (or yes/no, on/off, 1/0)",
                           section, option, kwargs)

    def _typed(self, read: Callable[..., Any], expected: str, section: str, option: str,
               kwargs: dict[str, Any], at_least: float | None = None,
               positive: bool = False) -> Any:
        try:
            value = read(section, option, **kwargs)
            valid = not isinstance(value, float) or math.isfinite(value)
        except ValueError:
            valid = False
        if not valid:
            raw = self.get(section, option, raw=True).strip()
            raise ConfigError(f"[{section}] {option}: {quoted(raw)} is not {expected}.")
        if value is None or isinstance(value, bool):
            return value
        if positive and value <= 0:
            raise ConfigError(f"[{section}] {option}: {value:g} must be greater than 0.")
        if at_least is not None and value < at_least:
            raise ConfigError(f"[{section}] {option}: {value:g} must be at least {at_least:g}.")
        return value

    def refuse_unknown(self, misspelled_sections_only: bool = False) -> None:
        """Raise ConfigError for the first section or option in the file never asked for.

        With `misspelled_sections_only`, only for a section close to a known one (used
        when loading stopped early, before every option was asked for).
        """
        known_sections = sorted({section for section, _ in self.asked})
        for section in self.sections():
            if section in known_sections:
                continue
            close = difflib.get_close_matches(section, known_sections, n=1)
            if close:
                raise ConfigError(f"[{short_text(section)}]: unknown section; did you mean [{close[0]}]?")
            if not misspelled_sections_only:
                raise ConfigError(f"[{short_text(section)}]: unknown section; the sections are "
                                  + ", ".join(f"[{name}]" for name in known_sections) + ".")
        if misspelled_sections_only:
            return
        defaults = self.defaults()
        for section in self.sections():
            for option in self.options(section):
                if option not in defaults and (section, option) not in self.asked:
                    raise ConfigError(f"[{section}] {short_text(option)}: unknown option; "
                                      + self._hint(section, option))
        known_anywhere = {option for _, option in self.asked}
        for option in defaults:
            if option not in known_anywhere:
                raise ConfigError(f"[{self.default_section}] {short_text(option)}: unknown option.")

    def _hint(self, section: str, option: str) -> str:
        here = sorted(name for known, name in self.asked if known == section)
        close = difflib.get_close_matches(option, here, n=1)
        if close:
            return f"did you mean {close[0]}?"
        elsewhere = sorted(known for known, name in self.asked if name == option)
        if elsewhere:
            return f"it belongs in [{elsewhere[0]}]."
        return f"the options of [{section}] are {', '.join(here)}."


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
    # Spare server lines per backend (at least; one per 10 nodes beyond): node changes
    # fill them at runtime, and only a backend out of them reloads (drivers/haproxy/slots.py).
    spare_servers: int = 8
    # The obsolete consolidate_after was set: accepted, ignored, and warned about.
    consolidate_after_given: bool = False
    template_dir: Path | None = None
    log_max_bytes: int = 64 * 1024 * 1024
    archive_timeout: float = 15.0
    # Where ARCHIVE may upload: host names or URL prefixes; empty means any host.
    archive_allowed_endpoints: tuple[str, ...] = ()
    archive_allow_plain_http: bool = False
    # Libra's session persistence, per protocol: the HTTP SERVERID cookie and the TCP
    # client-address table (handed over at reloads through peers_address).
    http_cookie_persistence: bool = True
    tcp_source_persistence: bool = True
    peers_address: tuple[str, int] = DEFAULT_PEERS_ADDRESS
    # Who starts, restarts and stops HAProxy and its log sink: the worker itself, or
    # systemd's units (libra-haproxy.service, libra-logsink.socket), which outlive it.
    supervisor: str = "worker"

    @property
    def supervised_by_systemd(self) -> bool:
        return self.supervisor == "systemd"


@dataclass(frozen=True)
class GearmanSettings:
    servers: tuple[tuple[str, int], ...]
    function: str
    poll_timeout: float = 2.0
    reconnect_delay_max: float = 2.0
    # Mutual TLS to every job server when all three are set (see libra_worker.tls).
    ssl_ca: Path | None = None
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    ssl_verify_hostname: bool = True
    # TCP keepalive on every job-server socket: a vanished host is noticed within
    # keepidle + keepintvl * keepcnt seconds.
    keepalive: bool = True
    keepidle: int = 60
    keepintvl: int = 10
    keepcnt: int = 5
    connect_timeout: float = 5.0
    # A job server that leaves a question (ECHO_REQ, GRAB_JOB) unanswered this long is
    # dropped: pygearman takes one job at a time, so a frozen server would stall them all.
    answer_timeout: float = 5.0
    # Where the worker publishes each job server's connection state (ctl status reads it).
    status_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ssl_ca is not None


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
class DiagnosticsSettings:
    """What DIAGNOSTICS probes besides the job servers, and how long each probe may take."""

    network_target: tuple[str, int] | None = None  # None: the first job server
    probe_timeout: float = 2.0


# DIAGNOSTICS must answer within 5 s even when every target blackholes.
MAX_PROBE_TIMEOUT = 4.0


@dataclass(frozen=True)
class Config:
    gearman: GearmanSettings
    worker: WorkerSettings
    haproxy: HAProxySettings
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    diagnostics: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)


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
            raise ConfigError(f"[gearman] servers: {quoted(item)} is not host:port.")
        servers.append((host, int(port)))
    if not servers:
        raise ConfigError("[gearman] servers must name at least one job server.")
    return tuple(servers)


def load(path: Path) -> Config:
    """Read, type and check the whole file; every error is one line naming `[section] key`."""
    parser = StrictParser()
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"Cannot read the configuration file {path}: {exc.strerror}.") from None
    except configparser.Error as exc:
        raise ConfigError(f"Cannot parse {path}: {short_text(str(exc), 200)}") from None
    try:
        try:
            config = _build(parser)
        except (ValueError, configparser.Error, ConfigError):
            # `[workr] state_dir = ...` says "state_dir is required": the typo is the cause.
            parser.refuse_unknown(misspelled_sections_only=True)
            raise
        parser.refuse_unknown()
    except (ValueError, configparser.Error, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _build(parser: StrictParser) -> Config:
    state_dir_text = parser.get("worker", "state_dir", fallback="").strip()
    if not state_dir_text:
        raise ConfigError("[worker] state_dir is required.")
    state_dir = Path(state_dir_text).expanduser().absolute()
    if len(str(state_dir / _LONGEST_SOCKET_NAME)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"[worker] state_dir: {short_text(str(state_dir), 120)} is too long for the unix "
            f"sockets kept in it (at most {_MAX_SOCKET_PATH - len(_LONGEST_SOCKET_NAME) - 1} "
            "characters)."
        )
    _check_directory("[worker] state_dir", state_dir)
    gearman = GearmanSettings(
        servers=parse_servers(parser.get("gearman", "servers", fallback="127.0.0.1:4730")),
        function=parser.get("gearman", "function", fallback="").strip() or socket.gethostname(),
        poll_timeout=parser.getfloat("gearman", "poll_timeout", fallback=2.0, positive=True),
        reconnect_delay_max=parser.getfloat("gearman", "reconnect_delay_max", fallback=2.0,
                                            positive=True),
        ssl_ca=_path(parser.get("gearman", "ssl_ca", fallback="")),
        ssl_cert=_path(parser.get("gearman", "ssl_cert", fallback="")),
        ssl_key=_path(parser.get("gearman", "ssl_key", fallback="")),
        ssl_verify_hostname=parser.getboolean("gearman", "ssl_verify_hostname", fallback=True),
        keepalive=parser.getboolean("gearman", "keepalive", fallback=True),
        keepidle=parser.getint("gearman", "keepidle", fallback=GearmanSettings.keepidle,
                               at_least=1),
        keepintvl=parser.getint("gearman", "keepintvl", fallback=GearmanSettings.keepintvl,
                                at_least=1),
        keepcnt=parser.getint("gearman", "keepcnt", fallback=GearmanSettings.keepcnt,
                              at_least=1),
        connect_timeout=parser.getfloat(
            "gearman", "connect_timeout", fallback=GearmanSettings.connect_timeout, positive=True
        ),
        answer_timeout=parser.getfloat(
            "gearman", "answer_timeout", fallback=GearmanSettings.answer_timeout, positive=True
        ),
        status_file=state_dir / GEARMAN_STATUS_NAME,
    )
    _check_gearman(gearman)
    worker = WorkerSettings(
        state_dir=state_dir,
        pid_file=_path(parser.get("worker", "pid_file", fallback="")) or state_dir / "worker.pid",
        log_file=_path(parser.get("worker", "log_file", fallback="")),
        log_level=_log_level(parser.get("worker", "log_level", fallback="INFO")),
        logging_config=_path(parser.get("worker", "logging_config", fallback="")),
        user=parser.get("worker", "user", fallback="").strip() or None,
        group=parser.get("worker", "group", fallback="").strip() or None,
        umask=_umask(parser.get("worker", "umask", fallback="022")),
        journal_entries=parser.getint("worker", "journal_entries", fallback=1000, at_least=1),
        reconcile_interval=parser.getfloat("worker", "reconcile_interval", fallback=1.0,
                                           positive=True),
        max_message_bytes=parser.getint(
            "worker", "max_message_bytes", fallback=DEFAULT_MAX_MESSAGE_BYTES, at_least=1024
        ),
    )
    _check_file_location("[worker] pid_file", worker.pid_file)
    _check_file_location("[worker] log_file", worker.log_file)
    _check_file_location("[worker] logging_config", worker.logging_config)
    defaults = HAProxySettings(state_dir=state_dir)
    haproxy = HAProxySettings(
        state_dir=state_dir,
        bind_address=parser.get("haproxy", "bind_address", fallback=defaults.bind_address).strip(),
        binary=parser.get("haproxy", "binary", fallback=defaults.binary).strip(),
        maxconn=parser.getint("haproxy", "maxconn", fallback=defaults.maxconn, at_least=1),
        command_timeout=parser.getfloat("haproxy", "command_timeout",
                                        fallback=defaults.command_timeout, positive=True),
        stop_grace=parser.getfloat("haproxy", "stop_grace", fallback=defaults.stop_grace,
                                   at_least=0),
        reload_attempts=parser.getint("haproxy", "reload_attempts",
                                      fallback=defaults.reload_attempts, at_least=1),
        reload_retry_wait=parser.getfloat(
            "haproxy", "reload_retry_wait", fallback=defaults.reload_retry_wait, at_least=0
        ),
        spare_servers=parser.getint("haproxy", "spare_servers",
                                    fallback=defaults.spare_servers, at_least=1),
        consolidate_after_given=parser.get("haproxy", "consolidate_after",
                                           fallback=None) is not None,
        template_dir=_path(parser.get("haproxy", "template_dir", fallback="")),
        log_max_bytes=parser.getint("archive", "log_max_bytes", fallback=defaults.log_max_bytes,
                                    at_least=1),
        archive_timeout=parser.getfloat("archive", "timeout", fallback=defaults.archive_timeout,
                                        positive=True),
        archive_allowed_endpoints=_allowed_endpoints(
            parser.get("archive", "allowed_endpoints", fallback="")
        ),
        archive_allow_plain_http=parser.getboolean("archive", "allow_plain_http", fallback=False),
        http_cookie_persistence=parser.getboolean("haproxy", "http_cookie_persistence",
                                                  fallback=defaults.http_cookie_persistence),
        tcp_source_persistence=parser.getboolean("haproxy", "tcp_source_persistence",
                                                 fallback=defaults.tcp_source_persistence),
        peers_address=_peers_address(parser.get("haproxy", "peers_address", fallback="")),
        supervisor=_supervisor(parser.get("haproxy", "supervisor", fallback=defaults.supervisor)),
    )
    _check_bind_address(haproxy.bind_address)
    if haproxy.template_dir is not None:
        _check_directory("[haproxy] template_dir", haproxy.template_dir)
    return Config(gearman=gearman, worker=worker, haproxy=haproxy, timeouts=_timeouts(parser),
                  diagnostics=_diagnostics(parser))


def _diagnostics(parser: StrictParser) -> DiagnosticsSettings:
    target_text = parser.get("diagnostics", "network_target", fallback="").strip()
    probe_timeout = parser.getfloat("diagnostics", "probe_timeout",
                                    fallback=DiagnosticsSettings.probe_timeout)
    target = None
    if target_text:
        try:
            (target,) = parse_servers(target_text)
        except (ConfigError, ValueError):
            raise ConfigError(
                f"[diagnostics] network_target must be one host:port, got {target_text[:40]!r}."
            ) from None
    if not 0 < probe_timeout <= MAX_PROBE_TIMEOUT:
        raise ConfigError(
            f"[diagnostics] probe_timeout must be more than 0 and at most {MAX_PROBE_TIMEOUT:g} "
            "seconds."
        )
    return DiagnosticsSettings(network_target=target, probe_timeout=probe_timeout)


def _timeouts(parser: StrictParser) -> TimeoutSettings:
    default = parser.getfloat("timeouts", "default", fallback=TimeoutSettings.default,
                              positive=True)
    per_action = {}
    for action in Action:
        value = parser.getfloat("timeouts", action.value.lower(), fallback=None, positive=True)
        if value is not None:
            per_action[action] = value
    return TimeoutSettings(default=default, per_action=per_action)


def _check_gearman(settings: GearmanSettings) -> None:
    given = [name for name in ("ssl_ca", "ssl_cert", "ssl_key") if getattr(settings, name)]
    if given and len(given) < 3:
        raise ConfigError(
            f"[gearman] ssl_ca, ssl_cert and ssl_key go together (only {', '.join(given)} is set)."
        )
    if not settings.ssl_verify_hostname:
        named = [host for host, _ in settings.servers if not _is_ip_address(host)]
        if named:
            raise ConfigError(
                f"[gearman] ssl_verify_hostname = false is only for job servers given by IP "
                f"address; {quoted(named[0])} is a host name, whose certificate must name it."
            )


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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


def _log_level(text: str) -> str:
    level = text.strip().upper()
    names = [name for name in logging.getLevelNamesMapping() if name not in ("NOTSET", "WARN", "FATAL")]
    if level not in names:
        raise ConfigError(f"[worker] log_level: {quoted(text.strip())} is not one of "
                          f"{', '.join(sorted(names, key=logging.getLevelName))}.")
    return level


def _supervisor(text: str) -> str:
    value = text.strip().lower()
    if value not in SUPERVISORS:
        raise ConfigError(f"[haproxy] supervisor: {quoted(text.strip())} is neither "
                          f"{' nor '.join(SUPERVISORS)}.")
    return value


def _umask(text: str) -> int:
    try:
        value = int(text.strip(), 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise ConfigError(f"[worker] umask: {quoted(text.strip())} is not an octal mode "
                          "between 000 and 777 (e.g. 027).")
    return value


def _not_a_directory(path: Path) -> str | None:
    """Why `path` can never be a directory here, or None (it is one, or could be made).

    Only what is certain: a part of the path that is a file. Whether the service may
    create or write it is for the start-up checks, which run as the service user.
    """
    for candidate in (path, *path.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        if stat.S_ISDIR(mode):
            return None
        shown = short_text(str(path), 120)
        return f"{shown} is not a directory" + ("" if candidate == path else f" ({candidate} is a file)")
    return None


def _check_directory(key: str, path: Path) -> None:
    problem = _not_a_directory(path)
    if problem:
        raise ConfigError(f"{key}: {problem}.")


def _check_file_location(key: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        is_directory = path.is_dir()
    except PermissionError:  # the service user's directory: for the start-up checks to judge
        is_directory = False
    if is_directory:
        raise ConfigError(f"{key}: {short_text(str(path), 120)} is a directory, not a file.")
    problem = _not_a_directory(path.parent)
    if problem:
        raise ConfigError(f"{key}: {short_text(str(path), 120)} cannot exist: {problem}.")


def _check_bind_address(address: str) -> None:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(
            f"[haproxy] bind_address: {quoted(address)} is not an IP address."
        ) from None
    if getattr(parsed, "scope_id", None) is not None:
        raise ConfigError(f"[haproxy] bind_address: {quoted(address)} must not carry an "
                          "IPv6 zone.")


def _peers_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:PORT` or `[::1]:PORT`: a loopback address, never one beyond the host,
    for the peers listener only HAProxy's next process connects to."""
    text = text.strip()
    if not text:
        return DEFAULT_PEERS_ADDRESS
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[haproxy] peers_address: {quoted(text)} is not address:port "
                          "(e.g. 127.0.0.1:7441 or [::1]:7441).")
    if not address.is_loopback or getattr(address, "scope_id", None) is not None:
        raise ConfigError(f"[haproxy] peers_address: {quoted(text)} is not a loopback address; "
                          "the stick-table hand-over never listens beyond this host.")
    return str(address), int(port)
