"""Mutual TLS to the job servers, for real: stunnel (client certificates required) in front
of a real gearmand, the real worker and libra-client on the other side, certificates made
here. TLS 1.2 and 1.3 both; clients without a good certificate submit nothing; bad files
are refused at start-up; a wrong CA is reported, retried, and recovered from."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from libra_worker import client
from tests.integration.support import (
    AS_NOBODY,
    REPO_ROOT,
    Gearmand,
    environment_for,
    free_port,
    make_temp_dir,
    wait_until,
)
from tests.integration.test_worker_transport import run_client
from tests.tls_support import CertificateAuthority, Stunnel, gearman_tls_options

TLS_VERSIONS = ["TLSv1.2", "TLSv1.3"]


@pytest.fixture
def pki(tmp_path):
    """The deployment's CA, the job server's certificate, and the worker's."""
    authority = CertificateAuthority(tmp_path / "pki", "deploy-ca")
    return authority, authority.issue("jobserver"), authority.issue("worker")


@pytest.fixture
def terminators(gearmand: Gearmand, pki, tmp_path):
    """`terminator(tls_version="TLSv1.3", server=None)` -> a started stunnel in front of gearmand."""
    authority, server_cert, _ = pki
    started: list[Stunnel] = []

    def make(tls_version: str = "TLSv1.3", server=None, port: int | None = None) -> Stunnel:
        tunnel = Stunnel(tmp_path, port or free_port(), gearmand.port, server or server_cert,
                         authority.ca, tls_version)
        started.append(tunnel.start())
        return tunnel

    try:
        yield make
    finally:
        for tunnel in started:
            tunnel.stop()


def tls_worker(worker_factory, tunnel: Stunnel, authority: CertificateAuthority, issued, *,
               start: bool = True, ca: Path | None = None, **options):
    return worker_factory(
        start=start, servers=[tunnel.address],
        gearman_options={**gearman_tls_options(ca or authority.ca, issued), **options},
        client_tls=authority.client_files(issued))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("tls_version", TLS_VERSIONS)
def test_worker_serves_jobs_through_the_terminator(worker_factory, terminators, pki, tls_version):
    authority, _, worker_cert = pki
    tunnel = terminators(tls_version)
    worker = tls_worker(worker_factory, tunnel, authority, worker_cert)

    for action in ("DISCOVER", "STATS", "DISCOVER"):
        assert "hpcs_response" in worker.submit(action, timeout=10)
    assert "Registered at job server" in worker.log_text()
    # Job lines name their action (a passed ping's line is at DEBUG: STATS fails, no LB).
    assert "STATS answered FAIL" in worker.log_text()

    # pygearman's TLS read spun on SSL_ERROR_WANT_READ (TLS 1.3 session tickets) at 100% CPU
    # while the worker waited for jobs: an idle worker must stay idle.
    before = cpu_seconds(worker.process.pid)
    time.sleep(3)
    assert cpu_seconds(worker.process.pid) - before < 0.5

    status = json.loads((worker.state_dir / "gearman.status").read_text())
    assert status["servers"][tunnel.address]["state"] == "up", status

    # libra-client with the same files, from options and from the worker's own config.
    by_options = run_client("--servers", tunnel.address, "--ssl-ca", str(authority.ca),
                            "--ssl-cert", str(worker_cert.cert), "--ssl-key", str(worker_cert.key),
                            "--timeout", "20", worker.function, "DISCOVER")
    assert by_options.returncode == 0, by_options.stderr
    by_config = run_client("--config", str(worker.config_path), "--timeout", "20",
                           worker.function, "DISCOVER")
    assert by_config.returncode == 0, by_config.stderr
    assert json.loads(by_config.stdout)["hpcs_response"] == "PASS"
    negotiated = set(re.findall(r"(TLSv1\.\d) ciphersuite:", tunnel.log()))
    assert negotiated == {tls_version}, tunnel.log()


def _raw_submit_job(connection: socket.socket, function: str) -> bytes:
    """SUBMIT_JOB (DISCOVER) on an open connection; whatever comes back before it closes."""
    body = function.encode() + b"\0unique-1\0" + b'{"hpcs_action": "DISCOVER"}'
    connection.sendall(b"\0REQ" + struct.pack(">II", 7, len(body)) + body)
    received = b""
    try:
        while chunk := connection.recv(4096):
            received += chunk
    except (OSError, ssl.SSLError):
        pass
    return received


def test_clients_without_a_good_certificate_submit_nothing(worker_factory, terminators, pki,
                                                           gearmand, tmp_path):
    authority, _, worker_cert = pki
    tunnel = terminators("TLSv1.3")
    worker = tls_worker(worker_factory, tunnel, authority, worker_cert)
    journal = worker.state_dir / "jobs.journal"
    jobs_before = journal.read_text().count("\n")

    # No certificate at all: TLS to the terminator, trusting its CA, presenting nothing.
    context = ssl.create_default_context(cafile=str(authority.ca))
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
                answer = _raw_submit_job(connection, worker.function)
        except (ssl.SSLError, OSError):
            answer = b""
    assert answer == b""

    # A certificate from another CA, through libra-client.
    stranger = CertificateAuthority(tmp_path / "other-pki", "other-ca")
    intruder = stranger.issue("intruder")
    refused = run_client("--servers", tunnel.address, "--ssl-ca", str(authority.ca),
                         "--ssl-cert", str(intruder.cert), "--ssl-key", str(intruder.key),
                         "--timeout", "5", worker.function, "DISCOVER")
    assert refused.returncode == 4, refused.stdout  # no job server reachable
    assert refused.stdout == ""
    assert f"the job server refused our certificate, ssl_cert {intruder.cert}" in refused.stderr, \
        refused.stderr

    # Nothing reached the job server or the worker.
    time.sleep(1)
    assert gearmand.function_status(worker.function)[:2] == (0, 0)
    assert journal.read_text().count("\n") == jobs_before
    assert "DISCOVER" in worker.submit("DISCOVER")["hpcs_action"]


def start_up_error(config: Path, as_user: tuple[str, ...] = (),
                   python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*as_user, python, "-m", "libra_worker.cli", "--config",
                           str(config), "--foreground"], capture_output=True, text=True,
                          timeout=30, cwd=REPO_ROOT, env=environment_for(python))


def test_bad_tls_files_are_refused_at_start_up(worker_factory, pki, tmp_path):
    authority, _, worker_cert = pki
    other = authority.issue("other")
    expired = authority.issue("expired", expired=True)
    world_readable = authority.issue("loose")
    world_readable.key.chmod(0o644)
    cases = {
        "mismatch": ({"ssl_key": str(other.key)},
                     f"ssl_key {other.key} does not match [gearman] ssl_cert {worker_cert.cert}"),
        "expired": ({"ssl_cert": str(expired.cert), "ssl_key": str(expired.key)},
                    f"ssl_cert {expired.cert} expired on"),
        "world-readable": ({"ssl_cert": str(world_readable.cert), "ssl_key": str(world_readable.key)},
                           f"ssl_key {world_readable.key} is readable by everyone (mode 0644)"),
        "unreadable": ({"ssl_key": str(tmp_path / "absent.key")},
                       f"ssl_key {tmp_path / 'absent.key'}: cannot read it (No such file"),
        "a directory": ({"ssl_key": str(tmp_path)}, f"ssl_key {tmp_path}: cannot read it"),
        "not a CA": ({"ssl_ca": str(worker_cert.key)}, f"ssl_ca {worker_cert.key} holds no usable CA"),
        "half": ({"ssl_ca": ""}, "ssl_ca, ssl_cert and ssl_key go together"),
    }
    for name, (override, expected) in cases.items():
        options = {**gearman_tls_options(authority.ca, worker_cert), **override}
        worker = worker_factory(start=False, servers=["127.0.0.1:4730"], gearman_options=options)
        result = start_up_error(worker.config_path)
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr, (name, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_a_wrong_ca_is_reported_retried_and_recovered(worker_factory, terminators, pki, tmp_path):
    authority, _, worker_cert = pki
    # The terminator presents a certificate from a CA the worker does not trust.
    rogue = CertificateAuthority(tmp_path / "rogue-pki", "rogue-ca")
    tunnel = terminators("TLSv1.3", server=rogue.issue("rogue-jobserver"))
    worker = tls_worker(worker_factory, tunnel, authority, worker_cert, start=False)
    worker.spawn()

    status_file = worker.state_dir / "gearman.status"
    expected = f"cannot verify the job server's certificate against ssl_ca {authority.ca}"
    wait_until(lambda: expected in worker.log_text(), 20, "the TLS error in the log")
    wait_until(lambda: status_file.exists() and json.loads(status_file.read_text())
               ["servers"][tunnel.address]["state"] == "down", 10, "the status file to say down")
    assert expected in json.loads(status_file.read_text())["servers"][tunnel.address]["error"]
    ctl = subprocess.run([sys.executable, "-m", "libra_worker.cli", "ctl", "--config",
                          str(worker.config_path), "status"], capture_output=True, text=True,
                         timeout=30, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert f"{tunnel.address} down since" in ctl.stdout and expected in ctl.stdout, ctl.stdout
    with pytest.raises(client.TransportError):
        worker.submit("DISCOVER", timeout=2)
    time.sleep(3)  # several retries (one a second) ...
    assert worker.is_running()
    # ... but one warning line, not one per attempt.
    assert worker.log_text().count(expected) == 1, worker.log_text()

    # The operator fixes the terminator: same port, a certificate from the right CA.
    tunnel.stop()
    terminators("TLSv1.3", port=tunnel.port)
    wait_until(lambda: "is back" in worker.log_text(), 20, "the worker to log the server is back")
    assert worker.submit("DISCOVER", timeout=10)["hpcs_response"] == "PASS"
    assert json.loads(status_file.read_text())["servers"][tunnel.address]["state"] == "up"


def test_the_job_servers_name_is_checked_with_an_opt_out_for_ip_only_servers(
        worker_factory, terminators, pki):
    authority, _, worker_cert = pki
    # A job-server certificate that names a host, not the IP address the worker uses.
    tunnel = terminators("TLSv1.3", server=authority.issue("named", hosts=("jobserver.example",)))
    checked = tls_worker(worker_factory, tunnel, authority, worker_cert, start=False)
    checked.spawn()
    wait_until(lambda: "does not name the host it was reached at" in checked.log_text(), 20,
               "the name mismatch in the log")
    assert "IP address mismatch" in checked.log_text()

    opted_out = worker_factory(
        servers=[tunnel.address],
        gearman_options={**gearman_tls_options(authority.ca, worker_cert),
                         "ssl_verify_hostname": "false"},
        client_tls=replace(authority.client_files(worker_cert), verify_hostname=False))
    assert opted_out.submit("DISCOVER")["hpcs_response"] == "PASS"


def test_a_key_the_workers_user_cannot_read_is_refused_at_start_up(nobody_python):
    root = make_temp_dir()  # pytest's tmp_path is under a 0700 directory
    try:
        authority = CertificateAuthority(root / "pki", "deploy-ca")
        worker_cert = authority.issue("worker")
        # Everything readable by `nobody` but the key (0600, root's).
        for path in (root, root / "pki"):
            path.chmod(0o755)
        for path in (authority.ca, worker_cert.cert):
            path.chmod(0o644)
        config = root / "worker.ini"
        config.write_text("[gearman]\n" + "".join(
            f"{key} = {value}\n"
            for key, value in gearman_tls_options(authority.ca, worker_cert).items())
            + f"[worker]\nstate_dir = {root / 'state'}\n")
        config.chmod(0o644)
        # The state_dir is nobody's: what start-up refuses is the key alone.
        (root / "state").mkdir()
        shutil.chown(root / "state", "nobody", "nogroup")

        result = start_up_error(config, AS_NOBODY, nobody_python)

        assert result.returncode == 2, result.stderr
        assert result.stderr == (f"libra-worker: [gearman] ssl_key {worker_cert.key}: cannot read "
                                 f"it (Permission denied).\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("tls_version", TLS_VERSIONS)
def test_a_worker_whose_certificate_the_terminator_refuses_says_so(worker_factory, terminators,
                                                                  pki, tmp_path, tls_version):
    authority, _, _ = pki
    # With TLS 1.3 the client's handshake completes before the server checks its certificate;
    # the refusal arrives as an alert afterwards, and must not count as "registered".
    outsider = CertificateAuthority(tmp_path / "outsider-pki", "outsider-ca").issue("worker")
    tunnel = terminators(tls_version)
    worker = worker_factory(start=False, servers=[tunnel.address],
                            gearman_options=gearman_tls_options(authority.ca, outsider))
    worker.spawn()
    expected = f"TLS: the job server refused our certificate, ssl_cert {outsider.cert}"
    wait_until(lambda: expected in worker.log_text(), 20, "the refusal in the log")
    time.sleep(2)  # a few more attempts
    log = worker.log_text()
    assert "Registered at job server" not in log and "is back" not in log, log
    assert log.count(expected) == 1, log
    state = json.loads((worker.state_dir / "gearman.status").read_text())["servers"][tunnel.address]
    assert state["state"] == "down" and expected in state["error"], (state, log)
