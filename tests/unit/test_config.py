"""Unit tests for libra_worker.config: the worker's INI file."""

from __future__ import annotations

import configparser
import re
import socket
from pathlib import Path

import pytest

from libra_worker import config
from libra_worker.config import ConfigError, load, parse_servers

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "etc" / "libra-worker.conf"


@pytest.fixture
def write_config(tmp_path):
    def _write(text: str) -> Path:
        path = tmp_path / "worker.conf"
        path.write_text(text)
        return path

    return _write


def minimal(state_dir: Path, extra: str = "") -> str:
    return f"[worker]\nstate_dir = {state_dir}\n{extra}"


# ---------------------------------------------------------------------- defaults


def test_defaults(write_config, tmp_path):
    state_dir = tmp_path / "state"
    settings = load(write_config(minimal(state_dir)))
    assert settings.gearman.servers == (("127.0.0.1", 4730),)
    assert settings.gearman.function == socket.gethostname()
    assert settings.gearman.poll_timeout == 2.0
    assert settings.worker.state_dir == state_dir
    assert settings.worker.pid_file == state_dir / "worker.pid"
    assert settings.worker.log_file is None
    assert settings.worker.log_level == "INFO"
    assert settings.worker.user is None and settings.worker.group is None
    assert settings.worker.umask == 0o022
    assert settings.haproxy.state_dir == state_dir
    assert settings.haproxy.bind_address == "0.0.0.0"
    assert settings.haproxy.binary == "haproxy"
    assert settings.haproxy.maxconn == 4096
    assert settings.haproxy.command_timeout == 30.0
    assert settings.haproxy.template_dir is None
    assert settings.haproxy.log_max_bytes == 64 * 1024 * 1024
    assert settings.haproxy.archive_timeout == 15.0


def test_function_defaults_to_hostname_when_blank(write_config, tmp_path):
    text = minimal(tmp_path, "[gearman]\nfunction =   \n")
    assert load(write_config(text)).gearman.function == socket.gethostname()


def test_values_read(write_config, tmp_path):
    text = minimal(tmp_path, (
        "log_level = debug\numask = 077\nuser = haproxy\n"
        "[gearman]\nservers = 10.1.1.1:4731, gear.example\nfunction = lb-17  ; comment\n"
        "poll_timeout = 0.5\n"
        "[haproxy]\nbind_address = ::\nmaxconn = 100\nbinary = /opt/haproxy\n"
        "[archive]\nlog_max_bytes = 1000\ntimeout = 3\n"
    ))
    settings = load(write_config(text))
    assert settings.gearman.servers == (("10.1.1.1", 4731), ("gear.example", 4730))
    assert settings.gearman.function == "lb-17"
    assert settings.gearman.poll_timeout == 0.5
    assert settings.worker.log_level == "DEBUG"
    assert settings.worker.umask == 0o077
    assert settings.worker.user == "haproxy"
    assert settings.haproxy.bind_address == "::"
    assert settings.haproxy.maxconn == 100
    assert settings.haproxy.binary == "/opt/haproxy"
    assert settings.haproxy.log_max_bytes == 1000
    assert settings.haproxy.archive_timeout == 3.0


def test_relative_state_dir_made_absolute(write_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(write_config(minimal(Path("state")))).worker.state_dir == tmp_path / "state"


# ---------------------------------------------------------------------- servers


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:4730", (("127.0.0.1", 4730),)),
    ("a:1,b:2", (("a", 1), ("b", 2))),
    (" a:1 , , b ", (("a", 1), ("b", 4730))),
    ("gearman.example", (("gearman.example", 4730),)),
    ("[::1]:4731", (("::1", 4731),)),
    ("h:65535", (("h", 65535),)),
])
def test_parse_servers(text, expected):
    assert parse_servers(text) == expected


@pytest.mark.parametrize("text", ["a:", ":4730", "a:0", "a:65536", "a:http", "a:-1", "a:1,b:x"])
def test_parse_servers_bad_entries(text):
    with pytest.raises(ConfigError, match=r"\[gearman\] servers: .* is not host:port"):
        parse_servers(text)


@pytest.mark.parametrize("text", ["", " , ,"])
def test_parse_servers_needs_one(text):
    with pytest.raises(ConfigError, match="at least one job server"):
        parse_servers(text)


@pytest.mark.parametrize(
    "text, expected",
    [("::1", (("::1", 4730),)), ("[::1]:4731", (("::1", 4731),)), ("[::1]", (("::1", 4730),))],
)
def test_ipv6_servers(text, expected):
    assert parse_servers(text) == expected


def test_bad_servers_in_file(write_config, tmp_path):
    with pytest.raises(ConfigError, match="'a:b'"):
        load(write_config(minimal(tmp_path, "[gearman]\nservers = a:b\n")))


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("text", ["[worker]\n", "[worker]\nstate_dir =   \n", "[gearman]\nservers = a:1\n"])
def test_state_dir_required(write_config, text):
    with pytest.raises(ConfigError, match=r"\[worker\] state_dir is required"):
        load(write_config(text))


def test_too_long_state_dir_rejected(write_config):
    # haproxy-master.sock (19) + "/" must fit in sun_path's 107 usable bytes.
    longest_ok = "/" + "d" * (107 - len("/haproxy-master.sock") - 1)
    assert load(write_config(minimal(Path(longest_ok)))).worker.state_dir == Path(longest_ok)
    with pytest.raises(ConfigError, match="too long for the unix sockets"):
        load(write_config(minimal(Path(longest_ok + "d"))))


@pytest.mark.parametrize("address", ["localhost", "0.0.0.0:80", "256.1.1.1", "any"])
def test_bad_bind_address_rejected(write_config, tmp_path, address):
    with pytest.raises(ConfigError, match=r"\[haproxy\] bind_address .* is not an IP address"):
        load(write_config(minimal(tmp_path, f"[haproxy]\nbind_address = {address}\n")))


def test_bind_address_with_unsafe_zone_rejected(write_config, tmp_path):
    with pytest.raises(ConfigError, match="bind_address"):
        load(write_config(minimal(tmp_path, "[haproxy]\nbind_address = fe80::1%%eth0 x\n")))


@pytest.mark.parametrize("extra", ["[haproxy]\nmaxconn = lots\n", "umask = 999\n",
                                   "[gearman]\npoll_timeout = soon\n"])
def test_bad_numbers_rejected_with_file_name(write_config, tmp_path, extra):
    path = write_config(minimal(tmp_path, extra))
    with pytest.raises(ConfigError, match=str(path)):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read the configuration file"):
        load(tmp_path / "absent.conf")


def test_unparseable_file(write_config):
    with pytest.raises(ConfigError, match="Cannot parse"):
        load(write_config("state_dir = /x\n"))  # no section header


# ---------------------------------------------------------------------- the shipped file


SKIP_UNLESS_SHIPPED = pytest.mark.skipif(
    not SHIPPED_CONFIG.exists(), reason=f"{SHIPPED_CONFIG} is not written yet (the lead is writing it)"
)


def _uncomment_examples(text: str) -> str:
    """The shipped file with its commented-out `# option = value` examples switched on."""
    return re.sub(r"(?m)^#\s*([a-z_]+\s*=)", r"\1", text)


def _documented_options(text: str) -> list[tuple[str, str]]:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read_string(text)
    return [(section, option) for section in parser.sections() for option in parser.options(section)]


@SKIP_UNLESS_SHIPPED
def test_shipped_config_parses():
    settings = load(SHIPPED_CONFIG)
    assert settings.worker.state_dir.is_absolute()
    assert len(str(settings.worker.state_dir / config._LONGEST_SOCKET_NAME)) <= 107
    assert settings.gearman.servers
    assert settings.gearman.function


@SKIP_UNLESS_SHIPPED
def test_shipped_config_examples_parse_when_uncommented(tmp_path):
    path = tmp_path / "all-options.conf"
    path.write_text(_uncomment_examples(SHIPPED_CONFIG.read_text()))
    assert load(path).worker.state_dir == load(SHIPPED_CONFIG).worker.state_dir


@SKIP_UNLESS_SHIPPED
def test_every_documented_option_is_read(tmp_path):
    """Giving each documented option (examples included) a different value must change
    the loaded Config or be refused: an option the loader ignores (a typo, a renamed
    key) would otherwise silently keep its default."""
    text = _uncomment_examples(SHIPPED_CONFIG.read_text())
    path = tmp_path / "probe.conf"
    path.write_text(text)
    reference = load(path)
    ignored = []
    options = _documented_options(text)
    assert len(options) >= 5
    for section, option in options:
        parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
        parser.read_string(text)
        parser.set(section, option, "9.75" if parser.get(section, option) != "9.75" else "8.25")
        with open(path, "w") as handle:
            parser.write(handle)
        try:
            changed = load(path) != reference
        except ConfigError:
            changed = True
        if not changed:
            ignored.append(f"[{section}] {option}")
    assert ignored == []


# ---------------------------------------------------------------------- hostile input, ARCHIVE


def test_hostile_input_and_archive_defaults(write_config, tmp_path):
    settings = load(write_config(minimal(tmp_path)))
    assert settings.worker.max_message_bytes == 8 * 1024 * 1024
    assert settings.haproxy.archive_allowed_endpoints == ()
    assert settings.haproxy.archive_allow_plain_http is False


def test_archive_allow_list_read(write_config, tmp_path):
    text = minimal(tmp_path, "max_message_bytes = 1000000\n[archive]\n"
                   "allowed_endpoints = swift.example.com, https://10.0.0.5:8080/v1/AUTH_a\n"
                   "    objects.example.org\nallow_plain_http = true\n")
    settings = load(write_config(text))
    assert settings.worker.max_message_bytes == 1_000_000
    assert settings.haproxy.archive_allowed_endpoints == (
        "swift.example.com", "https://10.0.0.5:8080/v1/AUTH_a", "objects.example.org")
    assert settings.haproxy.archive_allow_plain_http is True


@pytest.mark.parametrize("entry", ["ftp://swift.example.com/", "https:///v1", "swift example!"])
def test_archive_allow_list_entries_must_be_hosts_or_http_prefixes(write_config, tmp_path, entry):
    with pytest.raises(ConfigError, match=r"\[archive\] allowed_endpoints"):
        load(write_config(minimal(tmp_path, f"[archive]\nallowed_endpoints = {entry}\n")))


@pytest.mark.parametrize("value", ["0", "-5", "1023"])
def test_a_message_limit_that_refuses_every_message_is_refused(write_config, tmp_path, value):
    with pytest.raises(ConfigError, match=r"\[worker\] max_message_bytes"):
        load(write_config(minimal(tmp_path, f"max_message_bytes = {value}\n")))
