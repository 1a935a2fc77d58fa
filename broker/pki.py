"""The federation's PKI: one CA, the broker's server cert, one cert per identity.

Every key is Ed25519, so the key that authenticates a client to the broker (mutual TLS) is
the same key that signs its envelopes: one secret per site, one thing to protect and revoke.
The role travels in the cert (OU) so receivers can check it without asking anyone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.csr import create_request, write_private
from common.csr import key_pem as _key_pem
from common.identity import ROLES, validate_identity_name

__all__ = ["create_request", "write_private"]  # the site's half lives in common.csr

CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class KeyPair:
    """A PEM cert and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(federation: str) -> KeyPair:
    """A self-signed CA that signs every cert of one federation."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("the federation CA key is not an Ed25519 key")
    return cert, key


def _leaf(
    ca: KeyPair,
    subject: x509.Name,
    public_key: ed25519.Ed25519PublicKey,
    usage: ExtendedKeyUsageOID,
    days: int,
    sans: list[x509.GeneralName] | None = None,
) -> bytes:
    ca_cert, ca_key = _load_ca(ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, None).public_bytes(serialization.Encoding.PEM)


def create_server_cert(ca: KeyPair, hosts: list[str], days: int = LEAF_DAYS) -> KeyPair:
    """The broker's TLS cert, valid for localhost, 127.0.0.1 and every extra host given."""
    key = ed25519.Ed25519PrivateKey.generate()
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")])
    cert = _leaf(ca, subject, key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, days, names)
    return KeyPair(cert, _key_pem(key))


def create_identity_cert(ca: KeyPair, name: str, role: str, days: int = LEAF_DAYS,
                         key_pem: bytes | None = None) -> KeyPair:
    """A client cert whose CN is the identity (the MQTT username) and OU its role.

    With `key_pem`, the cert is for that existing key (a renewal: the site keeps its key).
    """
    validate_identity_name(name)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if key_pem is None:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        loaded = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(loaded, ed25519.Ed25519PrivateKey):
            raise ValueError("the identity key is not an Ed25519 key")
        key = loaded
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = _leaf(ca, subject, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, days)
    return KeyPair(cert, _key_pem(key))


@dataclass(frozen=True)
class Request:
    """A checked CSR: who asks, for which role, with which public key."""

    name: str
    role: str
    public_key: ed25519.Ed25519PublicKey


def read_request(csr_pem: bytes) -> Request:
    """Parse and check a CSR: self-signed by its key, Ed25519, a valid name and role.

    Only the name, the role and the key are taken from it; any extension it asks for is ignored.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise ValueError("the request's signature does not match its key")
    key = csr.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the request's key is not Ed25519 (create it with `fbm-node request`)")
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn:
        raise ValueError("the request names no identity (no CN)")
    role = str(ou[0].value) if ou else ""
    return Request(validate_identity_name(str(cn[0].value)), role, key)


def sign_request(ca: KeyPair, request: Request, role: str, days: int = LEAF_DAYS) -> bytes:
    """The certificate for a checked request (PEM)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, request.name)])
    return _leaf(ca, subject, request.public_key, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def cert_fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_not_after(cert_pem: bytes) -> float:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
