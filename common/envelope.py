"""The one envelope every message travels in: sealing (sign) and opening (check) it.

Wire form: a msgpack map `{v, type, id, ts, sender, job, round, body, cert, sig}` where `body`
is the msgpack bytes of the typed body, `cert` the sender's DER cert and `sig` an Ed25519
signature over `[v, type, id, ts, sender, job, round, sha256(body)]`. Signing the body's digest
rather than the body keeps signing cost flat for a 500 MB model (one sha256 pass).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ValidationError

from common import codec
from common.errors import BadMessage, Reason
from common.identity import Identity, Peer, TrustStore
from common.messages import spec_for

PROTOCOL_VERSION = 1
_HEADER_FIELDS = ("v", "type", "id", "ts", "sender", "job", "round")


@dataclass(frozen=True)
class Message:
    """A received message that passed every check."""

    type: str
    id: str
    ts: float
    sender: str
    role: str
    job: str | None
    round: int | None
    body: BaseModel
    topic: str = ""
    retained: bool = False


def _signed_bytes(header: dict[str, Any], body: bytes) -> bytes:
    return codec.encode([*(header[k] for k in _HEADER_FIELDS), hashlib.sha256(body).digest()])


def seal(
    identity: Identity,
    type_: str,
    body: BaseModel | dict[str, Any],
    *,
    job: str | None = None,
    round_: int | None = None,
    msg_id: str | None = None,
) -> tuple[str, bytes]:
    """Validate `body` against its type, sign it as `identity`: (message id, wire bytes)."""
    spec = spec_for(type_)
    if isinstance(body, dict):
        body = spec.model.model_validate(body)
    elif not isinstance(body, spec.model):
        raise TypeError(f"body of {type_!r} must be {spec.model.__name__}, got {type(body).__name__}")
    if identity.role not in spec.roles:
        raise PermissionError(f"a {identity.role} may not send {type_!r} (allowed: {sorted(spec.roles)})")
    body_bytes = codec.encode(body.model_dump(mode="python"))
    header = {
        "v": PROTOCOL_VERSION,
        "type": type_,
        "id": msg_id or uuid.uuid4().hex,
        "ts": time.time(),
        "sender": identity.name,
        "job": job,
        "round": round_,
    }
    sig = identity.sign(_signed_bytes(header, body_bytes))
    wire = codec.encode({**header, "body": body_bytes, "cert": identity.cert_der, "sig": sig})
    return header["id"], wire


def _header(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadMessage(Reason.BAD_ENVELOPE, f"envelope is a {type(raw).__name__}, not a map")
    if raw.get("v") != PROTOCOL_VERSION:
        raise BadMessage(Reason.BAD_VERSION, f"protocol version {raw.get('v')!r}, expected {PROTOCOL_VERSION}")
    expected = {"type": str, "id": str, "ts": (int, float), "sender": str, "body": bytes, "cert": bytes}
    for key, kinds in expected.items():
        if not isinstance(raw.get(key), kinds):
            raise BadMessage(Reason.BAD_ENVELOPE, f"envelope field {key!r} missing or mistyped")
    if raw.get("job") is not None and not isinstance(raw["job"], str):
        raise BadMessage(Reason.BAD_ENVELOPE, "envelope field 'job' must be a string or nil")
    if raw.get("round") is not None and not isinstance(raw["round"], int):
        raise BadMessage(Reason.BAD_ENVELOPE, "envelope field 'round' must be an integer or nil")
    return raw


def open_envelope(data: bytes | bytearray | memoryview, trust: TrustStore, topic: str = "",
                  retained: bool = False) -> Message:
    """Check and decode wire bytes; BadMessage with the reason if anything is wrong.

    Order matters: the signature and the sender's role are checked before the body is
    decoded, so nothing from an unauthenticated sender reaches the tensor decoder.
    """
    raw = _header(codec.decode(data))
    try:
        spec = spec_for(raw["type"])
    except KeyError:
        raise BadMessage(Reason.UNKNOWN_TYPE, f"unknown message type {raw['type']!r}") from None
    sig = raw.get("sig")
    if not isinstance(sig, bytes) or not sig:
        raise BadMessage(Reason.UNSIGNED, f"{raw['type']} from {raw['sender']!r} is not signed")
    peer: Peer = trust.peer(raw["cert"], raw["sender"])
    try:
        peer.public_key.verify(sig, _signed_bytes(raw, raw["body"]))
    except InvalidSignature:
        raise BadMessage(Reason.BAD_SIGNATURE, f"{raw['type']} from {raw['sender']!r}: signature does not match") from None
    if peer.role not in spec.roles:
        raise BadMessage(
            Reason.ROLE_NOT_ALLOWED, f"a {peer.role} ({peer.name}) may not send {raw['type']!r}"
        )
    try:
        body = spec.model.model_validate(codec.decode(raw["body"]))
    except ValidationError as exc:
        raise BadMessage(Reason.BAD_BODY, f"{raw['type']} body invalid: {exc.errors(include_url=False)}") from None
    return Message(
        type=raw["type"],
        id=raw["id"],
        ts=float(raw["ts"]),
        sender=raw["sender"],
        role=peer.role,
        job=raw.get("job"),
        round=raw.get("round"),
        body=body,
        topic=topic,
        retained=retained,
    )
