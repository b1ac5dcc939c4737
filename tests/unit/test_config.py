"""Unit tests for libra_worker.config: the worker's INI file."""

from __future__ import annotations

import configparser
import re
import socket
import subprocess
import sys
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
    # Libra's worker kept sessions on their node: on unless turned off.
    assert settings.haproxy.http_cookie_persistence is True
    assert settings.haproxy.tcp_source_persistence is True
    assert settings.haproxy.peers_address == ("127.0.0.1", 7441)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:20001", ("127.0.0.1", 20001)),
    ("127.0.0.2:7441", ("127.0.0.2", 7441)),
    ("[::1]:7441", ("::1", 7441)),
])
def test_peers_address_read(write_config, tmp_path, text, expected):
    settings = load(write_config(minimal(tmp_path, f"[haproxy]\npeers_address = {text}\n")))
    assert settings.haproxy.peers_address == expected


@pytest.mark.parametrize("text, problem", [
    ("0.0.0.0:7441", "is not a loopback address"),
    ("10.0.0.1:7441", "is not a loopback address"),
    ("[::]:7441", "is not a loopback address"),
    ("[::1%%lo]:7441", "is not a loopback address"),
    ("localhost:7441", "is not address:port"),
    ("127.0.0.1", "is not address:port"),
    ("127.0.0.1:0", "is not address:port"),
    ("127.0.0.1:65536", "is not address:port"),
    ("::1:7441", "is not address:port"),
])
def test_peers_address_refused_unless_loopback_address_and_port(write_config, tmp_path, text,
                                                                problem):
    with pytest.raises(ConfigError, match=r"\[haproxy\] peers_address: .*" + problem) as caught:
        load(write_config(minimal(tmp_path, f"[haproxy]\npeers_address = {text}\n")))
    assert "\n" not in str(caught.value)


def test_persistence_turned_off_per_protocol(write_config, tmp_path):
    text = minimal(tmp_path, "[haproxy]\nhttp_cookie_persistence = off\n"
                             "tcp_source_persistence = no\n")
    settings = load(write_config(text)).haproxy
    assert (settings.http_cookie_persistence, settings.tcp_source_persistence) == (False, False)
    with pytest.raises(ConfigError, match=r"\[haproxy\] tcp_source_persistence: 'sometimes' is not"):
        load(write_config(minimal(tmp_path, "[haproxy]\ntcp_source_persistence = sometimes\n")))


def test_spare_servers_read_and_bounded(write_config, tmp_path):
    assert load(write_config(minimal(tmp_path))).haproxy.spare_servers == 8
    settings = load(write_config(minimal(tmp_path, "[haproxy]\nspare_servers = 40\n"))).haproxy
    assert settings.spare_servers == 40
    with pytest.raises(ConfigError, match=r"\[haproxy\] spare_servers: 0 must be at least 1"):
        load(write_config(minimal(tmp_path, "[haproxy]\nspare_servers = 0\n")))


@pytest.mark.parametrize("value", ["0.1", "0", "whatever"])
def test_the_obsolete_consolidate_after_is_accepted_and_noted(write_config, tmp_path, value):
    # A configuration of an earlier release must still start; the driver warns once.
    assert not load(write_config(minimal(tmp_path))).haproxy.consolidate_after_given
    settings = load(write_config(minimal(tmp_path, f"[haproxy]\nconsolidate_after = {value}\n")))
    assert settings.haproxy.consolidate_after_given


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
    with pytest.raises(ConfigError, match=r"\[haproxy\] bind_address: .* is not an IP address"):
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


# ---------------------------------------------------------------------- strictness


@pytest.mark.parametrize("extra, message", [
    ("[haproxy]\nbind-address = 127.0.0.1\n",
     r"\[haproxy\] bind-address: unknown option; did you mean bind_address\?"),
    ("[gearmn]\nservers = 127.0.0.1:4730\n", r"\[gearmn\]: unknown section; did you mean \[gearman\]\?"),
    ("reconcile_intervall = 2\n", r"\[worker\] reconcile_intervall: .*did you mean reconcile_interval\?"),
    ("[timeouts]\nupdte = 5\n", r"\[timeouts\] updte: .*did you mean update\?"),
    ("[haproxy]\nlog_max_bytes = 1000\n",
     r"\[haproxy\] log_max_bytes: unknown option; it belongs in \[archive\]"),
    ("[haproxy]\ncolour = blue\n",
     r"\[haproxy\] colour: unknown option; the options of \[haproxy\] are .*bind_address"),
    ("[extras]\nx = 1\n", r"\[extras\]: unknown section; the sections are .*\[gearman\]"),
    ("[DEFAULT]\nstray = 1\n", r"\[DEFAULT\] stray: unknown option"),
])
def test_unknown_sections_and_options_are_refused_with_a_hint(write_config, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load(write_config(minimal(tmp_path, extra)))


def test_a_long_unknown_name_is_quoted_as_a_short_prefix(write_config, tmp_path):
    with pytest.raises(ConfigError) as refused:
        load(write_config(minimal(tmp_path, f"{'x' * 300} = 1\n")))
    assert f"[worker] {'x' * 40}...: unknown option; the options of [worker] are " in str(refused.value)
    assert "x" * 41 not in str(refused.value)


def test_a_misspelled_section_is_named_before_what_it_hides(write_config, tmp_path):
    # The typo leaves state_dir unset; the error names the typo, not the missing option.
    with pytest.raises(ConfigError, match=r"\[workr\]: unknown section; did you mean \[worker\]\?"):
        load(write_config(f"[workr]\nstate_dir = {tmp_path}\n"))


def test_option_names_are_case_insensitive_and_per_action_timeouts_are_known(write_config, tmp_path):
    text = minimal(tmp_path, "Journal_Entries = 5\n[timeouts]\nupdate = 7\nSTATS = 3\nArchive = 60\n")
    settings = load(write_config(text))
    assert settings.worker.journal_entries == 5
    assert {action.value: seconds for action, seconds in settings.timeouts.per_action.items()} == {
        "UPDATE": 7.0, "STATS": 3.0, "ARCHIVE": 60.0}


def test_known_options_are_what_the_loader_reads():
    """No second list: an option is known once the code asks for it, however it is read."""
    parser = config.StrictParser()
    parser.read_string("[new]\nsize = 3\nflag = yes\nname = x\nstray = 1\n")
    assert parser.getint("new", "size", fallback=1) == 3
    assert parser.getboolean("new", "flag", fallback=False) is True
    assert parser.get("new", "name", fallback="") == "x"
    assert parser.getfloat("new", "absent", fallback=None) is None
    with pytest.raises(ConfigError, match=r"\[new\] stray: unknown option"):
        parser.refuse_unknown()
    parser.get("new", "stray")
    parser.refuse_unknown()


@pytest.mark.parametrize("extra, message", [
    ("journal_entries = abc\n", r"\[worker\] journal_entries: 'abc' is not a whole number\."),
    ("journal_entries = 0\n", r"\[worker\] journal_entries: 0 must be at least 1\."),
    ("reconcile_interval = 0\n", r"\[worker\] reconcile_interval: 0 must be greater than 0\."),
    ("[gearman]\npoll_timeout = soon\n", r"\[gearman\] poll_timeout: 'soon' is not a number\."),
    ("[gearman]\npoll_timeout = nan\n", r"\[gearman\] poll_timeout: 'nan' is not a number\."),
    ("[haproxy]\nmaxconn = 1.5\n", r"\[haproxy\] maxconn: '1.5' is not a whole number\."),
    ("[haproxy]\nstop_grace = -1\n", r"\[haproxy\] stop_grace: -1 must be at least 0\."),
    ("[timeouts]\nupdate = -3\n", r"\[timeouts\] update: -3 must be greater than 0\."),
    ("[timeouts]\ndefault = 0\n", r"\[timeouts\] default: 0 must be greater than 0\."),
    ("umask = 999\n", r"\[worker\] umask: '999' is not an octal mode between 000 and 777"),
    ("umask = 01777\n", r"\[worker\] umask: '01777' is not an octal mode"),
    ("log_level = VERBOSE\n",
     r"\[worker\] log_level: 'VERBOSE' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL\."),
    ("[haproxy]\nbinary = /opt/100%\n", r"\[haproxy\] binary: '/opt/100%' has a lone '%'"),
])
def test_bad_values_name_their_option(write_config, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load(write_config(minimal(tmp_path, extra)))


def test_log_level_is_case_insensitive(write_config, tmp_path):
    assert load(write_config(minimal(tmp_path, "log_level = warning\n"))).worker.log_level == "WARNING"


def test_a_long_bad_value_is_quoted_as_a_short_prefix(write_config, tmp_path):
    with pytest.raises(ConfigError) as refused:
        load(write_config(minimal(tmp_path, f"[haproxy]\nmaxconn = {'9x' * 500}\n")))
    message = str(refused.value).split(": ", 1)[1]
    assert message.startswith("[haproxy] maxconn: '9x9x") and "… (1000 characters)" in message
    assert len(message) < 120, message


def test_state_dir_under_a_file_names_the_option(write_config, tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"[worker] state_dir: {a_file}/state is not a directory ({a_file} is a file).")):
        load(write_config(minimal(a_file / "state")))
    with pytest.raises(ConfigError, match=re.escape(f"[worker] state_dir: {a_file} is not a directory.")):
        load(write_config(minimal(a_file)))


@pytest.mark.parametrize("option", ["pid_file", "log_file", "logging_config"])
def test_file_options_under_a_file_or_naming_a_directory_are_refused(write_config, tmp_path, option):
    a_file = tmp_path / "plain"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=re.escape(
            f"[worker] {option}: {a_file}/x cannot exist: {a_file} is not a directory.")):
        load(write_config(minimal(tmp_path / "state", f"{option} = {a_file}/x\n")))
    with pytest.raises(ConfigError, match=re.escape(f"[worker] {option}: {tmp_path} is a directory")):
        load(write_config(minimal(tmp_path / "state", f"{option} = {tmp_path}\n")))


def test_template_dir_must_be_a_directory(write_config, tmp_path):
    a_file = tmp_path / "haproxy.cfg.j2"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"[haproxy] template_dir: {a_file} is not a directory")):
        load(write_config(minimal(tmp_path / "state", f"[haproxy]\ntemplate_dir = {a_file}\n")))


# ---------------------------------------------------------------------- the shipped file


def _uncomment_examples(text: str) -> str:
    """The shipped file with its commented-out `# option = value` examples switched on."""
    return re.sub(r"(?m)^#\s*([a-z_]+\s*=)", r"\1", text)


def _documented_options(text: str) -> list[tuple[str, str]]:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read_string(text)
    return [(section, option) for section in parser.sections() for option in parser.options(section)]


def test_shipped_config_loads_as_shipped_on_any_device():
    settings = load(SHIPPED_CONFIG)
    assert len(str(settings.worker.state_dir / config._LONGEST_SOCKET_NAME)) <= 107
    assert settings.gearman.servers == (("127.0.0.1", 4730),)
    # Each device registers under its own name unless the operator sets one.
    assert settings.gearman.function == socket.gethostname()
    assert settings.worker.logging_config is None
    assert settings.worker.user is None


def test_shipped_paths_are_the_directories_systemd_makes_for_the_unit():
    settings = load(SHIPPED_CONFIG).worker
    paths = {"StateDirectory": settings.state_dir, "RuntimeDirectory": settings.pid_file.parent}
    roots = {"StateDirectory": Path("/var/lib"), "RuntimeDirectory": Path("/run")}
    assert paths == {key: roots[key] / "libra-worker" for key in paths}
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "etc" / "libra-worker.service")
    declared = {key: unit.get("Service", key) for key in paths if unit.has_option("Service", key)}
    assert "StateDirectory" in declared
    for key, name in declared.items():
        assert paths[key] == roots[key] / name, (key, name)


def test_shipped_logging_conf_is_a_working_file_config(tmp_path):
    """etc/logging.conf through logging.config.fileConfig, writing into a temp dir instead of
    /var/log/libra-worker (in a child, so this test run's logging is left alone)."""
    text = (REPO / "etc" / "logging.conf").read_text()
    assert "/var/log/libra-worker/worker.log" in text
    log_file = tmp_path / "worker.log"
    copy = tmp_path / "logging.conf"
    copy.write_text(text.replace("/var/log/libra-worker/worker.log", str(log_file)))
    program = (
        "import logging, logging.config, sys\n"
        "logging.config.fileConfig(sys.argv[1], disable_existing_loggers=False)\n"
        "logging.getLogger('libra_worker').info('kept')\n"
        "logging.getLogger('swiftclient').info('dropped')\n"
    )
    subprocess.run([sys.executable, "-c", program, str(copy)], check=True, timeout=30)
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO libra_worker: kept"), lines


def test_shipped_config_examples_parse_when_uncommented(tmp_path):
    path = tmp_path / "all-options.conf"
    path.write_text(_uncomment_examples(SHIPPED_CONFIG.read_text()))
    assert load(path).worker.state_dir == load(SHIPPED_CONFIG).worker.state_dir


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


# ---------------------------------------------------------------------- [diagnostics]


def test_diagnostics_defaults(write_config, tmp_path):
    settings = load(write_config(minimal(tmp_path / "state")))
    assert settings.diagnostics == config.DiagnosticsSettings(network_target=None, probe_timeout=2.0)


def test_diagnostics_values_read(write_config, tmp_path):
    text = minimal(tmp_path / "state", "[diagnostics]\nnetwork_target = [::1]:8080\nprobe_timeout = 1.5\n")
    assert load(write_config(text)).diagnostics == config.DiagnosticsSettings(("::1", 8080), 1.5)


@pytest.mark.parametrize("extra, key", [
    ("network_target = a:1, b:2", "network_target"),
    ("network_target = host:99999", "network_target"),
    ("probe_timeout = 0", "probe_timeout"),
    ("probe_timeout = 4.5", "probe_timeout"),
])
def test_bad_diagnostics_values_name_the_key(write_config, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=rf"\[diagnostics\] {key}"):
        load(write_config(minimal(tmp_path / "state", f"[diagnostics]\n{extra}\n")))


def test_job_server_tls_and_keepalive_options(write_config, tmp_path):
    settings = load(write_config(minimal(tmp_path, (
        "[gearman]\nservers = 10.0.0.5:4730\nssl_ca = /etc/lw/ca.pem\nssl_cert = /etc/lw/w.pem\n"
        "ssl_key = /etc/lw/w.key\nssl_verify_hostname = false\nkeepidle = 1\nkeepintvl = 2\n"
        "keepcnt = 3\nconnect_timeout = 1.5\nanswer_timeout = 4\n"))))
    gearman = settings.gearman
    assert (gearman.tls, gearman.ssl_ca, gearman.ssl_cert, gearman.ssl_key) == (
        True, Path("/etc/lw/ca.pem"), Path("/etc/lw/w.pem"), Path("/etc/lw/w.key"))
    assert gearman.ssl_verify_hostname is False
    assert (gearman.keepalive, gearman.keepidle, gearman.keepintvl, gearman.keepcnt) == (True, 1, 2, 3)
    assert (gearman.connect_timeout, gearman.answer_timeout) == (1.5, 4.0)
    assert gearman.status_file == settings.worker.state_dir / "gearman.status"


def test_job_server_defaults_keepalive_on_no_tls(write_config, tmp_path):
    gearman = load(write_config(minimal(tmp_path))).gearman
    assert not gearman.tls and gearman.ssl_verify_hostname
    assert (gearman.keepalive, gearman.keepidle, gearman.keepintvl, gearman.keepcnt) == (True, 60, 10, 5)


@pytest.mark.parametrize("text, message", [
    ("ssl_ca = /ca.pem\n", r"ssl_ca, ssl_cert and ssl_key go together \(only ssl_ca is set\)"),
    ("servers = gear.example:4730\nssl_verify_hostname = false\n",
     r"ssl_verify_hostname = false is only for job servers given by IP address; 'gear.example'"),
    ("keepcnt = 0\n", r"\[gearman\] keepcnt: 0 must be at least 1"),
    ("answer_timeout = 0\n", r"\[gearman\] answer_timeout: 0 must be greater than 0"),
    ("keepalive = perhaps\n", r"\[gearman\] keepalive: 'perhaps' is not true or false"),
])
def test_bad_job_server_options(write_config, tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(write_config(minimal(tmp_path, "[gearman]\n" + text)))


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
