"""The one envelope every message travels in: sealing (sign) and opening (check) it.

Wire form: a msgpack map `{v, type, id, ts, sender, job, round, body, cert, sig}` where `body`
is the msgpack bytes of the typed body, `cert` the sender's DER cert and `sig` an Ed25519
signature over `[v, type, id, ts, sender, job, round, sha256(body), topic]`. Signing the body's
digest rather than the body keeps signing cost flat for a 500 MB model (one sha256 pass). The
topic is signed but not sent: the receiver checks the signature with the topic the message
came on, so a message moved to another topic (another job's, another owner's) fails it.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ValidationError

from common import codec, sealed
from common.errors import BadMessage, Reason
from common.identity import Identity, Peer, TrustStore
from common.messages import spec_for
from common.sealed import ContentKey, Keyring, SealError

PROTOCOL_VERSION = 2  # 2: the topic is signed (issue 18)
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
    wire: bytes | bytearray | memoryview = b""  # the signed bytes as received (relayed verbatim)
    sealed: bool = False  # the body came encrypted to us (common/sealed.py)


def _signed_bytes(header: dict[str, Any], body: bytes, topic: str = "") -> bytes:
    return _signed_digest(header, hashlib.sha256(body).digest(), topic)


def _signed_digest(header: dict[str, Any], digest: bytes, topic: str) -> bytes:
    return codec.encode([*(header[k] for k in _HEADER_FIELDS), digest, topic])


def _seal_aad(header: dict[str, Any]) -> bytes:
    """What a sealed body is bound to: the envelope's header, sender included (common/sealed.py)."""
    return b"fbm-seal-v1\0" + codec.encode([header[k] for k in _HEADER_FIELDS])


@dataclass(frozen=True)
class SealTo:
    """Seal the body with `key` for `names` (each wrapped in it): see common/sealed.py."""

    key: ContentKey
    names: tuple[str, ...]


SLICE = 4 * 1024 * 1024  # body bytes hashed (and handed to the sender) per step


@dataclass(frozen=True)
class SealedParts:
    """A sealed message as a stream: `size` bytes, produced by `parts` while being sent.

    The body leads and the signature trails, so the body's sha256 is computed slice by slice
    as the slices go out, and a 500 MB model starts moving before it is hashed. The bytes are
    exactly those of `seal` (which joins them).
    """

    msg_id: str
    size: int
    parts: Iterator[bytes | memoryview]


def seal_parts(
    identity: Identity,
    type_: str,
    body: BaseModel | dict[str, Any],
    *,
    job: str | None = None,
    round_: int | None = None,
    msg_id: str | None = None,
    seal_to: SealTo | None = None,
    topic: str = "",
) -> SealedParts:
    """Validate `body` against its type and produce its envelope as a stream (see SealedParts);
    with `seal_to`, the body is encrypted for those recipients and the ciphertext signed."""
    spec = spec_for(type_)
    if isinstance(body, dict):
        body = spec.model.model_validate(body)
    elif not isinstance(body, spec.model):
        raise TypeError(f"body of {type_!r} must be {spec.model.__name__}, got {type(body).__name__}")
    if identity.role not in spec.roles:
        raise PermissionError(f"a {identity.role} may not send {type_!r} (allowed: {sorted(spec.roles)})")
    body_parts = codec.encode_parts(body.model_dump(mode="python"))  # tensor data referenced, not copied
    body_len = sum(len(p) for p in body_parts)
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": type_,
        "id": msg_id or uuid.uuid4().hex,
        "ts": time.time(),
        "sender": identity.name,
        "job": job,
        "round": round_,
    }
    # the msgpack map {**header, body, cert, sig}, written in three pieces around the body
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    prefix = packer.pack_map_header(len(header) + 3) + b"".join(packer.pack(k) + packer.pack(v) for k, v in header.items())
    plan = sealed.plan(seal_to.key, seal_to.names) if seal_to is not None else None
    wire_body_len = body_len + (plan.overhead if plan is not None else 0)
    prefix += packer.pack("body") + _bin_header(wire_body_len)
    cert_part = packer.pack("cert") + packer.pack(identity.cert_der) + packer.pack("sig")
    sig_len = len(packer.pack(b"\0" * 64))  # Ed25519 signatures are 64 bytes

    def parts() -> Iterator[bytes | memoryview]:
        yield prefix
        digest = hashlib.sha256()
        pieces: Iterator[bytes | memoryview] = _slices(body_parts)
        if plan is not None:
            pieces = sealed.seal_stream(plan, _seal_aad(header), pieces)
        for piece in pieces:
            digest.update(piece)
            yield piece
        sig = identity.sign(_signed_digest(header, digest.digest(), topic))
        yield cert_part + packer.pack(sig)

    return SealedParts(header["id"], len(prefix) + wire_body_len + len(cert_part) + sig_len, parts())


def _slices(body_parts: list[bytes | memoryview]) -> Iterator[memoryview]:
    for part in body_parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), SLICE):
            yield view[start : start + SLICE]


def _bin_header(n: int) -> bytes:
    if n < 256:
        return bytes((0xC4, n))
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def seal(
    identity: Identity,
    type_: str,
    body: BaseModel | dict[str, Any],
    *,
    job: str | None = None,
    round_: int | None = None,
    msg_id: str | None = None,
    seal_to: SealTo | None = None,
    topic: str = "",
) -> tuple[str, bytes]:
    """Validate `body` against its type, sign it as `identity` for `topic` (where it will be
    published): (message id, wire bytes); with `seal_to`, encrypted for those recipients."""
    out = seal_parts(identity, type_, body, job=job, round_=round_, msg_id=msg_id, seal_to=seal_to, topic=topic)
    return out.msg_id, b"".join(out.parts)


_MAX_ENVELOPE_KEYS = 32  # the envelope has 10; a map claiming thousands is not one


def _unpack_envelope(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """The envelope map with `body` as a view into `data` (no copy of a 500 MB body), and
    where the body starts (-1 if it is not bytes).

    Only a flat map of strings, numbers, nil and bytes is read: nothing nested is ever
    decoded here, so a message costs no memory beyond its own bytes before its signature
    is checked (a general msgpack decode turned 4 MiB of nested empty maps into ~300 MiB)."""
    view = memoryview(data).cast("B")
    if not len(view) or view[0] not in _MAPS:
        raise _not_a_map(view)
    body_at = -1
    try:
        n, pos = _map_len(view, 0)
        if n > _MAX_ENVELOPE_KEYS:
            raise BadMessage(Reason.BAD_ENVELOPE, f"envelope map has {n} entries (at most {_MAX_ENVELOPE_KEYS})")
        out: dict[str, Any] = {}
        for _ in range(n):
            key, pos = _scalar(view, pos)
            if not isinstance(key, str):
                raise BadMessage(Reason.BAD_ENVELOPE, f"envelope key {key!r} is not a string")
            if key == "body":
                body_at = _payload_range(view, pos)[0] if view[pos] in _BINS else -1
            value, pos = _scalar(view, pos, key)
            out[key] = bytes(value) if isinstance(value, memoryview) and key != "body" else value
    except (IndexError, ValueError, struct.error) as exc:
        raise BadMessage(Reason.NOT_MSGPACK, f"undecodable envelope: {exc or type(exc).__name__}") from None
    if pos != len(view):
        raise BadMessage(Reason.NOT_MSGPACK, f"undecodable envelope: {len(view) - pos} bytes after the map")
    return out, body_at


def peek_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """An envelope's flat fields, NOT verified (for diagnostics such as a message's age);
    BadMessage if `data` is not a flat envelope map. Nothing nested is decoded."""
    return _unpack_envelope(data)[0]


def _not_a_map(view: memoryview) -> BadMessage:
    """Why bytes that do not start with a map are refused: not msgpack at all, or msgpack of
    another kind. `Unpacker.skip` walks the value without building it (no memory cost)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(view), 1))
    try:
        unpacker.feed(view)
        unpacker.skip()
    except (ValueError, msgpack.UnpackException, msgpack.OutOfData) as exc:
        return BadMessage(Reason.NOT_MSGPACK, f"undecodable msgpack: {type(exc).__name__}")
    if unpacker.tell() != len(view):
        return BadMessage(Reason.NOT_MSGPACK, "undecodable msgpack: extra data after the first value")
    return BadMessage(Reason.BAD_ENVELOPE, f"envelope is not a map (msgpack type byte 0x{view[0]:02x})")


def _precomputed_body_digest(data: Any, body: Any, body_at: int) -> bytes | None:
    """The body's sha256 as the reassembler computed it while the chunks arrived, if what it
    hashed is exactly where our own parse found the body (same range of the same buffer)."""
    digest, span = getattr(data, "span_sha256", None), getattr(data, "span", None)
    if digest is None or span is None or body_at < 0 or not isinstance(body, memoryview):
        return None
    return digest if (body_at, body_at + len(body)) == span else None


def body_span(head: memoryview) -> tuple[int, int] | None:
    """Where the body lies in an envelope that starts with `head` (its first chunk), so the
    reassembler can hash the body as it arrives; None if `head` does not say."""
    try:
        n, pos = _map_len(head, 0)
        for _ in range(n):
            key, pos = _scalar(head, pos)
            if key == "body":
                return _payload_range(head, pos) if head[pos] in _BINS else None
            _, pos = _scalar(head, pos, key)
    except (IndexError, ValueError, struct.error, BadMessage):
        return None
    return None


_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # fixmap, map16, map32


def _map_len(v: memoryview, pos: int) -> tuple[int, int]:
    b = v[pos]
    if 0x80 <= b <= 0x8F:
        return b & 0x0F, pos + 1
    if b == 0xDE:
        return struct.unpack_from(">H", v, pos + 1)[0], pos + 3
    if b == 0xDF:
        return struct.unpack_from(">I", v, pos + 1)[0], pos + 5
    raise ValueError("not a map")


_INTS = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
         0xCA: ">f", 0xCB: ">d"}
_BINS = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
_LENS = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I", **_BINS}  # str8/16/32 and bin8/16/32


def _payload_range(v: memoryview, pos: int) -> tuple[int, int]:
    """(start, end) of the bytes of the str or bin value whose header is at `pos`; `end` may
    lie beyond `v` (a first chunk says where the body ends before it has arrived)."""
    fmt = _LENS[v[pos]]
    start = pos + 1 + struct.calcsize(fmt)
    return start, start + struct.unpack_from(fmt, v, pos + 1)[0]


def _scalar(v: memoryview, pos: int, key: str | None = None) -> tuple[Any, int]:
    """The str, bytes (a view), number, bool or nil at `pos`; BadMessage if it is anything else
    (a nested array, map or ext is refused, not decoded)."""
    b = v[pos]
    if b <= 0x7F:
        return b, pos + 1
    if b >= 0xE0:
        return b - 0x100, pos + 1
    if 0xA0 <= b <= 0xBF:
        end = pos + 1 + (b & 0x1F)
        return bytes(v[pos + 1 : end]).decode(), end
    if b == 0xC0:
        return None, pos + 1
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos + 1
    if b in _INTS:
        fmt = _INTS[b]
        return struct.unpack_from(fmt, v, pos + 1)[0], pos + 1 + struct.calcsize(fmt)
    if b in _LENS:
        start, end = _payload_range(v, pos)
        if end > len(v):
            raise ValueError("truncated")
        return (bytes(v[start:end]).decode() if b >= 0xD9 else v[start:end]), end
    if key is None:
        raise BadMessage(Reason.BAD_ENVELOPE, "an envelope key is not a string")
    raise BadMessage(Reason.BAD_ENVELOPE, f"envelope field {key!r} is not a string, number, nil or bytes")


def _header(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadMessage(Reason.BAD_ENVELOPE, f"envelope is a {type(raw).__name__}, not a map")
    if raw.get("v") != PROTOCOL_VERSION:
        raise BadMessage(Reason.BAD_VERSION, f"protocol version {raw.get('v')!r}, expected {PROTOCOL_VERSION}")
    expected = {"type": str, "id": str, "ts": (int, float), "sender": str, "body": (bytes, memoryview), "cert": bytes}
    for key, kinds in expected.items():
        if not isinstance(raw.get(key), kinds):
            raise BadMessage(Reason.BAD_ENVELOPE, f"envelope field {key!r} missing or mistyped")
    if raw.get("job") is not None and not isinstance(raw["job"], str):
        raise BadMessage(Reason.BAD_ENVELOPE, "envelope field 'job' must be a string or nil")
    if raw.get("round") is not None and not isinstance(raw["round"], int):
        raise BadMessage(Reason.BAD_ENVELOPE, "envelope field 'round' must be an integer or nil")
    return raw


@dataclass(frozen=True)
class Verified:
    """An envelope whose signature (over its header, its body's sha256 and the topic) and
    sender's role were checked; its body not decoded yet."""

    header: dict[str, Any]
    role: str
    body_sha256: bytes
    size: int


def verify_envelope(data: bytes | bytearray | memoryview, trust: TrustStore, topic: str = "") -> Verified:
    """Check an envelope's signature and sender without decoding its body (the audit recorder
    needs no more); BadMessage with the reason if anything is wrong."""
    fields, body_at = _unpack_envelope(data)
    raw = _header(fields)
    body_digest = _precomputed_body_digest(data, raw["body"], body_at) or hashlib.sha256(raw["body"]).digest()
    try:
        spec = spec_for(raw["type"])
    except KeyError:
        raise BadMessage(Reason.UNKNOWN_TYPE, f"unknown message type {raw['type']!r}") from None
    sig = raw.get("sig")
    if not isinstance(sig, bytes) or not sig:
        raise BadMessage(Reason.UNSIGNED, f"{raw['type']} from {raw['sender']!r} is not signed")
    peer: Peer = trust.peer(raw["cert"], raw["sender"])
    try:
        peer.public_key.verify(sig, _signed_digest(raw, body_digest, topic))
    except InvalidSignature:
        raise BadMessage(Reason.BAD_SIGNATURE, f"{raw['type']} from {raw['sender']!r}: signature does not match "
                                               f"(altered, or signed for another topic than {topic!r})") from None
    if peer.role not in spec.roles:
        raise BadMessage(
            Reason.ROLE_NOT_ALLOWED, f"a {peer.role} ({peer.name}) may not send {raw['type']!r}"
        )
    return Verified(raw, peer.role, body_digest, len(memoryview(data)))


def open_envelope(data: bytes | bytearray | memoryview, trust: TrustStore, topic: str = "",
                  retained: bool = False, keyring: Keyring | None = None, content_key: bytes | None = None,
                  torch_tensors: bool = True) -> Message:
    """Check and decode wire bytes; BadMessage with the reason if anything is wrong.

    Order matters: only the flat header map is read before the signature (over the raw body
    bytes and the topic) and the sender's role are checked; the body is decrypted (if sealed,
    with `keyring`) and decoded after, so nothing from an unauthenticated sender reaches the
    decryptor, the msgpack or the tensor decoder. `content_key` opens a body sealed for others
    (a key handed on by one of its recipients: see Messenger.reopen). `torch_tensors`: see
    `common.codec.decode`.
    """
    checked = verify_envelope(data, trust, topic)
    raw, spec = checked.header, spec_for(checked.header["type"])
    clear = _unsealed(raw, keyring, content_key)
    try:
        body = spec.model.model_validate(codec.decode(clear, torch_tensors))
    except ValidationError as exc:
        raise BadMessage(Reason.BAD_BODY, f"{raw['type']} body invalid: {exc.errors(include_url=False)}") from None
    return Message(
        type=raw["type"],
        id=raw["id"],
        ts=float(raw["ts"]),
        sender=raw["sender"],
        role=checked.role,
        job=raw.get("job"),
        round=raw.get("round"),
        body=body,
        topic=topic,
        retained=retained,
        sealed=clear is not raw["body"],
    )


def _unsealed(raw: dict[str, Any], keyring: Keyring | None, content_key: bytes | None) -> bytes | memoryview:
    """The clear body: the body itself, or its decryption if it is sealed (BadMessage if we
    cannot open it: sealed for others, or tampered)."""
    body = raw["body"]
    if not sealed.is_sealed(body):
        return body
    if keyring is None and content_key is None:
        raise BadMessage(Reason.NOT_A_RECIPIENT, f"{raw['type']} from {raw['sender']!r} is sealed; no key to open it")
    try:
        if content_key is not None:
            return sealed.open_with_key(content_key, _seal_aad(raw), body)
        assert keyring is not None
        return sealed.open_body(keyring, _seal_aad(raw), body)
    except SealError as exc:
        raise BadMessage(Reason(exc.reason), f"{raw['type']} from {raw['sender']!r}: {exc.detail}") from None


def sealed_content_key(data: bytes | bytearray | memoryview, keyring: Keyring) -> bytes:
    """The content key of a sealed envelope we are a recipient of (its signature is NOT checked
    here: use it on a message already opened, e.g. a stored job); BadMessage if we cannot."""
    body = _unpack_envelope(data)[0].get("body")
    if not isinstance(body, (bytes, memoryview)) or not sealed.is_sealed(body):
        raise BadMessage(Reason.BAD_SEAL, "the message is not sealed")
    try:
        return sealed.content_key(keyring, body)
    except SealError as exc:
        raise BadMessage(Reason(exc.reason), exc.detail) from None


def sealed_recipients(data: bytes | bytearray | memoryview) -> list[str]:
    """Who a sealed envelope was sealed for ([] if it is clear or unreadable)."""
    body = _unpack_envelope(data)[0].get("body")
    if not isinstance(body, (bytes, memoryview)) or not sealed.is_sealed(body):
        return []
    try:
        return sealed.recipients(body)
    except SealError:
        return []
