"""TLS for the control port: a mounted certificate if there is one, else a self-signed one made once."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.access.statedir import FILE_MODE
from appliance.atomicfile import write_atomic
from appliance.errors import ConfigError


def ensure_certificate(web_dir: Path, extra_names: list[str] | None = None) -> tuple[Path, Path]:
    """Return (cert, key) paths: $BOOTBACK_TLS_CERT/$BOOTBACK_TLS_KEY, or WEB_DIR/tls.crt+tls.key (made if absent)."""
    env_cert, env_key = os.environ.get("BOOTBACK_TLS_CERT"), os.environ.get("BOOTBACK_TLS_KEY")
    if env_cert or env_key:
        if not (env_cert and env_key and Path(env_cert).is_file() and Path(env_key).is_file()):
            raise ConfigError("BOOTBACK_TLS_CERT and BOOTBACK_TLS_KEY must both name readable files")
        return Path(env_cert), Path(env_key)
    cert, key = web_dir / "tls.crt", web_dir / "tls.key"
    if cert.exists() and key.exists():
        return cert, key
    _self_signed(cert, key, extra_names or [])
    return cert, key


def _self_signed(cert_path: Path, key_path: Path, extra_names: list[str]) -> None:
    host = socket.gethostname()
    names = sorted({host, "localhost", *extra_names})
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, host),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bootback appliance (self-signed)"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))  # the longest validity browsers accept
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_atomic(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        FILE_MODE,
    )
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), FILE_MODE)
