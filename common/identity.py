"""Who a party is: its name, role, key and cert, and how to check anyone else's.

An identity bundle is the folder `fbm-broker enroll` writes and a site copies: the federation
CA cert, the identity's cert and Ed25519 key, and `bundle.json` (name, role, broker address).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from common.errors import BadMessage, Reason

ROLES = ("node", "researcher", "aggregator", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: `$` also matches before a final "\n"

BUNDLE_FILE = "bundle.json"
CA_FILE = "ca.crt"
CERT_FILE = "identity.crt"
KEY_FILE = "identity.key"


def validate_identity_name(name: str) -> str:
    """Names become MQTT topic levels and usernames: no wildcards, slashes or spaces."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid identity name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


@dataclass(frozen=True)
class Identity:
    """One party of the federation, able to sign what it sends."""

    name: str
    role: str
    key: ed25519.Ed25519PrivateKey
    cert_pem: bytes
    cert_der: bytes
    ca_pem: bytes
    bundle_dir: Path
    broker_host: str
    broker_port: int
    max_packet_bytes: int = 65 * 1024 * 1024

    @property
    def cert_path(self) -> Path:
        return self.bundle_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.bundle_dir / KEY_FILE

    @property
    def ca_path(self) -> Path:
        return self.bundle_dir / CA_FILE

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Identity:
        """Load a bundle folder; every problem is reported as a clear ValueError."""
        bundle_dir = Path(bundle_dir).expanduser().resolve()
        meta_path = bundle_dir / BUNDLE_FILE
        if not meta_path.is_file():
            raise ValueError(
                f"{bundle_dir} is not an identity bundle (no {BUNDLE_FILE}); "
                "create one with `fbm-broker enroll`"
            )
        meta = json.loads(meta_path.read_text())
        for needed in (CA_FILE, CERT_FILE, KEY_FILE):
            if not (bundle_dir / needed).is_file():
                raise ValueError(f"identity bundle {bundle_dir} is missing {needed}")
        cert_pem = (bundle_dir / CERT_FILE).read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key((bundle_dir / KEY_FILE).read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{bundle_dir / KEY_FILE} is not an Ed25519 key")
        if key.public_key().public_bytes_raw() != cert.public_key().public_bytes_raw():  # type: ignore[union-attr]
            raise ValueError(f"{bundle_dir}: the key does not match the certificate")
        name = _attr(cert, NameOID.COMMON_NAME) or ""
        role = _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) or ""
        if name != meta.get("name") or role != meta.get("role"):
            raise ValueError(f"{bundle_dir}: {BUNDLE_FILE} disagrees with the certificate")
        return cls(
            name=name,
            role=role,
            key=key,
            cert_pem=cert_pem,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            ca_pem=(bundle_dir / CA_FILE).read_bytes(),
            bundle_dir=bundle_dir,
            broker_host=str(meta.get("broker_host", "localhost")),
            broker_port=int(meta.get("broker_port", 8883)),
            max_packet_bytes=int(meta.get("max_packet_bytes", 65 * 1024 * 1024)),
        )


CHECKED_CERTS = 65536  # certs a TrustStore remembers having checked (a few hundred bytes each)


@dataclass(frozen=True)
class Peer:
    """A sender whose cert was checked against the federation CA."""

    name: str
    role: str
    public_key: ed25519.Ed25519PublicKey
    not_after: dt.datetime


class TrustStore:
    """Checks senders' certs against the federation CA; remembers certs already checked.

    The broker is not trusted: every envelope carries its sender's cert, and this store decides
    whether that cert was issued by our CA, is in date, and names the claimed sender.
    """

    def __init__(self, ca_pem: bytes, revoked: set[str] | None = None, cache_size: int = CHECKED_CERTS) -> None:
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        ca_key = self._ca.public_key()
        if not isinstance(ca_key, ed25519.Ed25519PublicKey):
            raise ValueError("the federation CA is not an Ed25519 CA")
        self._ca_key = ca_key
        self._cache: OrderedDict[bytes, Peer] = OrderedDict()  # least recently used first
        self._cache_size = cache_size
        self._revoked = set(revoked or ())
        self._lock = threading.Lock()

    def revoke(self, name: str) -> None:
        with self._lock:
            self._revoked.add(name)

    def peer(self, cert_der: bytes, claimed_sender: str) -> Peer:
        """The verified peer for a DER cert, or BadMessage saying why not."""
        digest = hashlib.sha256(cert_der).digest()
        with self._lock:
            peer = self._cache.get(digest)
            if peer is not None:
                self._cache.move_to_end(digest)
        if peer is None:
            peer = self._check(cert_der)
            with self._lock:
                # the least recently used goes, not all: cleared at 10,000, a 10,000-node round
                # re-checked nearly every cert (parse + the CA's signature) every round
                self._cache[digest] = peer
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        now = dt.datetime.now(dt.UTC)
        if now > peer.not_after:
            raise BadMessage(Reason.BAD_CERT, f"certificate of {peer.name} expired {peer.not_after}")
        if peer.name != claimed_sender:
            raise BadMessage(
                Reason.BAD_CERT, f"sender {claimed_sender!r} signed with the cert of {peer.name!r}"
            )
        if peer.name in self._revoked:
            raise BadMessage(Reason.BAD_CERT, f"identity {peer.name!r} is revoked")
        return peer

    def _check(self, cert_der: bytes) -> Peer:
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError as exc:
            raise BadMessage(Reason.BAD_CERT, f"unreadable certificate: {exc}") from exc
        if cert.issuer != self._ca.subject:
            raise BadMessage(Reason.BAD_CERT, "certificate not issued by the federation CA")
        try:
            self._ca_key.verify(cert.signature, cert.tbs_certificate_bytes)
        except InvalidSignature as exc:
            raise BadMessage(Reason.BAD_CERT, "certificate signature is not the federation CA's") from exc
        if dt.datetime.now(dt.UTC) < cert.not_valid_before_utc:
            raise BadMessage(Reason.BAD_CERT, "certificate not yet valid")
        name = _attr(cert, NameOID.COMMON_NAME)
        role = _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
        if not name or role not in ROLES:
            raise BadMessage(Reason.BAD_CERT, f"certificate lacks a name or a known role ({role!r})")
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BadMessage(Reason.BAD_CERT, "certificate key is not Ed25519")
        return Peer(name=name, role=role, public_key=key, not_after=cert.not_valid_after_utc)
