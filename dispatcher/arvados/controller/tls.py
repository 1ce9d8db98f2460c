"""Development TLS material: a small CA and a server certificate signed by it.

The Arvados SDK speaks HTTPS only, so a controller without ``TLS.Certificate``/``TLS.Key``
creates, on first start, ``<data dir>/tls/{ca.crt,ca.key,server.crt,server.key}``. Clients
either trust ``ca.crt`` or run with ``TLS.Insecure`` / ``ARVADOS_API_HOST_INSECURE=1``.

The CA is kept across restarts (so clients that trust it keep working); the server certificate
is re-issued when it lacks a requested host name or is within 30 days of expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertPaths:
    """Where the CA certificate, the server certificate and its key are."""

    ca_cert: Path
    cert: Path
    key: Path


def default_hostnames() -> list[str]:
    """Names a local development server is reached by."""
    names = ["localhost", "127.0.0.1", "::1"]
    with_host = socket.gethostname()
    if with_host and with_host not in names:
        names.append(with_host)
    return names


def strip_file_url(value: str) -> str:
    """Arvados accepts TLS paths as plain paths or ``file:///path``."""
    return value[len("file://"):] if value.startswith("file://") else value


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _san_entries(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(hostnames):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crunchgate development"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"crunchgate dev CA {socket.gethostname()}"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_public(ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return None
    return cert, key


def _server_ok(cert_path: Path, key_path: Path, ca: x509.Certificate, hostnames: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.subject or cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = set(san)
    return all(entry in have for entry in _san_entries(hostnames))


def ensure_dev_certs(data_dir: str | os.PathLike[str], hostnames: Iterable[str] = ()) -> CertPaths:
    """Create (or reuse) a dev CA and a server certificate for ``hostnames`` under
    ``<data_dir>/tls``. The defaults (localhost, 127.0.0.1, ::1, this host's name) are always
    included. Idempotent and cheap when nothing needs to change."""
    tls_dir = Path(data_dir) / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = CertPaths(tls_dir / "ca.crt", tls_dir / "server.crt", tls_dir / "server.key")
    ca_key_path = tls_dir / "ca.key"
    names = list(dict.fromkeys([*default_hostnames(), *hostnames]))

    loaded = _load_ca(paths.ca_cert, ca_key_path)
    ca_cert, ca_key = loaded if loaded is not None else _new_ca(paths.ca_cert, ca_key_path)
    if loaded is not None and _server_ok(paths.cert, paths.key, ca_cert, names):
        return paths

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths
