"""Certificates made on the spot (`cryptography`), and stunnel as the job servers' TLS terminator.

Nothing is pre-generated: each test makes its CAs and certificates in its temp dir. Keys
are written 0600, as an operator would.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from libra_worker.client import TLSFiles
from tests.integration.support import REPO_ROOT, port_accepts, start_server_child, stop_child

STUNNEL = "/usr/bin/stunnel4"
RECIPE = REPO_ROOT / "etc" / "stunnel-gearman.conf"
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A CA in `directory`: `ca.pem`, and `issue(name)` for servers and clients."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / f"{name}.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              expired: bool = False) -> Issued:
        """A leaf certificate for `name`, valid for `hosts` (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
                 for h in hosts]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        descriptor = os.open(issued.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return issued

    def client_files(self, issued: Issued) -> TLSFiles:
        return TLSFiles(self.ca, issued.cert, issued.key)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def gearman_tls_options(ca: Path, issued: Issued) -> dict[str, str]:
    return {"ssl_ca": str(ca), "ssl_cert": str(issued.cert), "ssl_key": str(issued.key)}


class Stunnel:
    """stunnel as the job servers' terminator, run from the shipped recipe in the foreground
    (our child): TLS on `port`, client certificates required (chained to `client_ca`),
    forwarding to a job server on loopback."""

    def __init__(self, root: Path, port: int, forward_port: int, server: Issued, client_ca: Path,
                 tls_version: str = "TLSv1.3") -> None:
        self.root = root
        self.port = port
        self.forward_port = forward_port
        self.server = server
        self.client_ca = client_ca
        self.tls_version = tls_version
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config_text(self) -> str:
        """The shipped recipe (etc/stunnel-gearman.conf) with this test's files and ports."""
        overrides = {
            "accept": f"127.0.0.1:{self.port}",
            "connect": f"127.0.0.1:{self.forward_port}",
            "cert": str(self.server.cert),
            "key": str(self.server.key),
            "CAfile": str(self.client_ca),
            "debug": "info",
            "pid": str(self.root / f"stunnel-{self.port}.pid"),
        }
        # Our child, as the test's user, logging to a file in the test's directory.
        dropped = {"setuid", "setgid", "syslog"}
        lines = []
        for line in RECIPE.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if line.startswith("["):
                lines.append(f"output = {self.root / f'stunnel-{self.port}.log'}")
            if line.startswith(";") or key in dropped:
                continue
            lines.append(f"{key} = {overrides[key]}" if key in overrides and "=" in line else line)
        lines.append(f"sslVersionMax = {self.tls_version}")
        return "\n".join(lines) + "\n"

    def start(self) -> "Stunnel":
        self.starts += 1
        config = self.root / f"stunnel-{self.port}.conf"
        config.write_text(self.config_text())
        self.process = start_server_child([STUNNEL, str(config)],
                                          self.root / f"stunnel-{self.port}.out",
                                          lambda: port_accepts(self.port),
                                          f"stunnel on port {self.port}")
        return self

    def stop(self) -> None:
        stop_child(self.process)

    def log(self) -> str:
        text = ""
        for name in (f"stunnel-{self.port}.out", f"stunnel-{self.port}.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")[-4000:]
        return text
