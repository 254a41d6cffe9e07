"""HTTPS for the coordinator: the operator's certificate, or a self-signed one made once in the
data dir. Peers need no CA for the latter: the join string carries the certificate's sha256
fingerprint (over its DER bytes) and clients pin it (``aiohttp.Fingerprint``)."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"
VALIDITY_DAYS = 3650  # pinned by fingerprint, so expiry buys nothing; renewing changes the pin


class TlsError(ValueError):
    """A certificate or key cannot be used (unreadable, mismatched, not PEM)."""


def fingerprint(cert_path: Path) -> str:
    """sha256 hex of the certificate's DER encoding (what ``aiohttp.Fingerprint`` compares)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as e:
        raise TlsError(f"cannot read certificate {cert_path}: {e}") from e
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def self_signed(data_dir: Path, hosts: list[str]) -> tuple[Path, Path]:
    """<data_dir>/tls.{crt,key}, created on first use (key 0600) for ``hosts`` (names or IPs,
    plus localhost). Kept across restarts so the pinned fingerprint stays valid."""
    cert_path, key_path = Path(data_dir) / CERT_NAME, Path(data_dir) / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host:
                names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lowband coordinator")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context; TlsError with the reason when the pair is unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot use certificate {cert_path} with key {key_path}: {e}") from e
    return ctx
