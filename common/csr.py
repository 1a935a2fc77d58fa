"""The site's half of enrolment: its own key and certificate signing request (CSR).

A site runs this (`fbm-node request`); only the CSR (public key, name, role) goes to the
federation's admin, who signs it with broker/pki.py. In `common` so that the node never
imports the broker's code.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from common.identity import ROLES, validate_identity_name


def key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_request(name: str, role: str) -> tuple[bytes, bytes]:
    """A site's own key and certificate signing request (CSR): (csr_pem, key_pem).

    The key stays with the site; only the CSR (public key, name, role) goes to the admin.
    """
    validate_identity_name(name)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, None)
    return csr.public_bytes(serialization.Encoding.PEM), key_pem(key)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)
