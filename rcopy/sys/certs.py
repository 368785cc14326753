"""Throw-away TLS certificates for one sync's NBD session, made in-process (no openssl process).

Each side makes a self-signed EC P-256 certificate per session and hands it to the other over the
authenticated ssh channel: the primary pins the backup's exactly, nbdkit admits only the primary's.
``not_valid_before`` is set an hour back: TLS checks validity dates even for a pinned certificate, and
a peer whose clock runs behind ours would otherwise refuse a certificate made a moment ago.
"""
from __future__ import annotations

import datetime
import os

CLOCK_SLACK = datetime.timedelta(hours=1)
LIFETIME = datetime.timedelta(days=7)


def make(cert_path: str, key_path: str, common_name: str) -> str:
    """Write a fresh certificate and its key (mode 0600) at those paths; returns the certificate PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SLACK).not_valid_after(now + LIFETIME)
            # what 'openssl req -x509' adds: a self-signed certificate that is its own trust anchor
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    with open(cert_path, "w") as f:
        f.write(pem)
    return pem
