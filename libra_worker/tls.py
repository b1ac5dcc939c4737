"""Mutual TLS to the job servers: the client context, start-up checks, readable errors.

Every job-server connection speaks TLS 1.2 or newer when `[gearman] ssl_ca`, `ssl_cert` and
`ssl_key` are set: the server's certificate must chain to `ssl_ca` and name the host the
worker connects to (an IP address is checked against the certificate's IP SANs), and the
worker presents its own certificate. `check_tls_files` refuses at start-up what can be known
then (unreadable, world-readable or encrypted key, a key that does not match the
certificate, an expired certificate, a CA file without certificates); a CA that does not
match the job server's only shows at the handshake, and `describe_tls_error` turns that
into one line naming the file.
"""

from __future__ import annotations

import datetime
import os
import ssl
import stat
from pathlib import Path

from cryptography import x509

from libra_worker.config import ConfigError, GearmanSettings


def client_context(settings: GearmanSettings) -> ssl.SSLContext | None:
    """The TLS context for every job-server connection; None when TLS is not configured."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ssl_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.ssl_verify_hostname
    context.load_cert_chain(str(settings.ssl_cert), str(settings.ssl_key), password=_no_password)
    return context


def check_tls_files(settings: GearmanSettings) -> None:
    """Refuse, with one line naming the file and the reason, what start-up can know is wrong."""
    if not settings.tls:
        return
    assert settings.ssl_ca and settings.ssl_cert and settings.ssl_key
    for name, path in (("ssl_ca", settings.ssl_ca), ("ssl_cert", settings.ssl_cert),
                       ("ssl_key", settings.ssl_key)):
        _check_readable(name, path)
    mode = stat.S_IMODE(os.stat(settings.ssl_key).st_mode)
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"[gearman] ssl_key {settings.ssl_key} is readable by everyone (mode {mode:04o}); "
            f"chmod o-rwx it."
        )
    try:
        ssl.create_default_context(cafile=str(settings.ssl_ca))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"[gearman] ssl_ca {settings.ssl_ca} holds no usable CA certificate ({_reason(exc)})."
        ) from None
    _check_validity(settings.ssl_cert)
    try:
        client_context(settings)
    except _EncryptedKey:
        raise ConfigError(
            f"[gearman] ssl_key {settings.ssl_key} is encrypted; the worker needs it unencrypted "
            f"(readable only by the worker's user)."
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"[gearman] ssl_key {settings.ssl_key} does not match [gearman] ssl_cert "
                f"{settings.ssl_cert}."
            ) from None
        raise ConfigError(
            f"[gearman] ssl_key {settings.ssl_key} is not a usable PEM private key "
            f"({_reason(exc)})."
        ) from None


def describe_tls_error(error: BaseException, settings: GearmanSettings) -> str:
    """One line for a failed handshake or a TLS alert, naming the setting to look at."""
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = error.verify_message or _reason(error)
        if error.verify_code in _NAME_MISMATCH:
            return (f"TLS: the job server's certificate does not name the host it was reached "
                    f"at ({detail}); for IP-only job servers see ssl_verify_hostname")
        return f"TLS: cannot verify the job server's certificate against ssl_ca {settings.ssl_ca} ({detail})"
    reason = _reason(error)
    if "ALERT" in reason.upper():
        # The job server's terminator refused us: our certificate, or its CA.
        return (f"TLS: the job server refused our certificate, ssl_cert {settings.ssl_cert} "
                f"({reason.lower().replace('_', ' ')})")
    return f"TLS: {reason}"


def describe_closed_after_handshake(settings: GearmanSettings) -> str:
    """For a TLS 1.3 session the job server ended, without an alert, before its first answer
    (see `JobServerConnection`): its refusal of our certificate is the likely cause, but
    the alert that would prove it was lost."""
    return (f"TLS: the job server refused our certificate, ssl_cert {settings.ssl_cert} "
            f"(most likely: it ended the TLS 1.3 session right after the handshake, before any "
            f"answer, and its alert was lost)")


class _EncryptedKey(Exception):
    """The key asks for a password; a service cannot type one."""


def _no_password() -> bytes:
    raise _EncryptedKey()


# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def _check_readable(name: str, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"[gearman] {name} {path}: cannot read it ({exc.strerror}).") from None


def _check_validity(path: Path) -> None:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(
            f"[gearman] ssl_cert {path} is not a PEM certificate ({str(exc)[:80]})."
        ) from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > certificate.not_valid_after_utc:
        raise ConfigError(
            f"[gearman] ssl_cert {path} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC."
        )
    if now < certificate.not_valid_before_utc:
        raise ConfigError(
            f"[gearman] ssl_cert {path} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC."
        )


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason) if reason else str(error)[:120]
