"""End-to-end sealing of a message body: what the broker relays, it cannot read (issue 18).

Pure functions and small value types; no I/O. The envelope (common/envelope.py) calls them.

**Keys.** Every identity has an X25519 key derived from its Ed25519 identity key with HKDF
(`Keyring.of`): no new file to enrol, copy or lose, and a restarted party has the same key. It
publishes the public half retained on `keys/{me}` in an `enc_key` message signed by its
certificate key (common/messenger.py), so a key is bound to an identity the way every message
is: by the CA-issued certificate's signature, and by the topic only that identity may write.

**Content key per stream.** A sender keeps one random AES-256 content key per stream (a topic:
one job's model, one node's updates of one job) and wraps it for each recipient: ephemeral
X25519 (one per content key) with the recipient's public key, HKDF-SHA256 bound to the stream,
the recipient's name and both public keys, AES-GCM of the content key. A recipient added later
(a node joining a job, an aggregator taking a job over) gets a wrap of the same key; a recipient
set that is not a superset of the last (someone removed, or a key changed) gets a new key.

**Body.** `0xC1` (a byte msgpack never uses, so a sealed body is never mistaken for a clear
one) | version | u32 header length | header (msgpack: stream, ephemeral key, nonce, wraps) |
AES-256-GCM ciphertext of the clear body | 16-byte tag. The AAD is the envelope's header
fields (type, id, ts, sender, job, round) and the sealed header: a ciphertext re-signed by
another identity, or moved to another message id, does not decrypt.

**Encrypt, then sign.** The signature is over the sealed body (the envelope signs its sha256),
so any receiver, the broker's audit included, checks the sender before decrypting anything, and
nothing unauthenticated reaches the decryptor (the memory-before-trust rule). Plain
encrypt-then-sign lets a third party strip the signature and re-sign the ciphertext as its own;
binding the sender into the AAD makes such a message fail to decrypt.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MARK = 0xC1  # "never used" in msgpack: a clear body (a msgpack map) never starts with it
VERSION = 1
NONCE = 12
TAG = 16
KEY_BYTES = 32
_PREFIX = struct.Struct(">BBI")  # mark, version, header length
_MAX_HEADER = 4 * 1024 * 1024  # ~40,000 recipients' wraps
_WRAP_NONCE = b"\0" * NONCE  # each wrap key is used once: unique per (ephemeral key, recipient)
UNWRAPPED_KEPT = 65536  # content keys a keyring remembers having unwrapped (~10 MB)


class SealError(ValueError):
    """A sealed body that cannot be opened: `not_a_recipient` or `bad_seal` (the reason)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Keyring:
    """One identity's X25519 key pair (the private half never leaves the process)."""

    name: str
    private: x25519.X25519PrivateKey
    public: bytes
    # (stream, ephemeral key, wrap) -> content key: a sender keeps one content key per stream, so
    # an aggregator would redo the same key agreement for every update of every round of a node
    unwrapped: OrderedDict[tuple[str, bytes, bytes], bytes] = field(
        default_factory=OrderedDict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, name: str, identity_key: ed25519.Ed25519PrivateKey) -> Keyring:
        """The identity's encryption key, derived from its signing key (same key every start)."""
        seed = HKDF(hashes.SHA256(), KEY_BYTES, salt=b"fbm-x25519-v1", info=name.encode()).derive(
            identity_key.private_bytes_raw())
        private = x25519.X25519PrivateKey.from_private_bytes(seed)
        return cls(name, private, private.public_key().public_bytes_raw())


def is_sealed(body: bytes | bytearray | memoryview) -> bool:
    return len(body) > 0 and body[0] == MARK


def _wrap_key(shared: bytes, stream: str, name: str, eph_pub: bytes, rcpt_pub: bytes) -> bytes:
    info = b"fbm-wrap-v1\0" + stream.encode() + b"\0" + name.encode() + b"\0" + eph_pub + rcpt_pub
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


@dataclass
class ContentKey:
    """A stream's content key, its ephemeral wrapping key and the wraps made so far."""

    stream: str
    key: bytes = field(default_factory=lambda: AESGCM.generate_key(bit_length=256))
    eph: x25519.X25519PrivateKey = field(default_factory=x25519.X25519PrivateKey.generate)
    recipients: dict[str, bytes] = field(default_factory=dict)  # name -> public key, who may have the key
    wraps: dict[str, bytes] = field(default_factory=dict)  # made when a body first carries one

    @property
    def eph_pub(self) -> bytes:
        return self.eph.public_key().public_bytes_raw()

    def wrap_for(self, name: str, public: bytes) -> None:
        peer = x25519.X25519PublicKey.from_public_bytes(public)
        wk = _wrap_key(self.eph.exchange(peer), self.stream, name, self.eph_pub, public)
        self.wraps[name] = AESGCM(wk).encrypt(_WRAP_NONCE, self.key, self.stream.encode())
        self.recipients[name] = public

    def wrap(self, name: str) -> bytes:
        """The wrap for recipient `name`, made on first use: a body that carries a few wraps
        (the rest of the recipients given the key otherwise) costs no key agreement for the others."""
        if name not in self.wraps:
            self.wrap_for(name, self.recipients[name])
        return self.wraps[name]


class ContentKeys:
    """The content key of each stream a sender seals (one per topic), kept while it lives."""

    def __init__(self, max_streams: int = 65536) -> None:
        self._keys: OrderedDict[str, ContentKey] = OrderedDict()  # least recently used first
        self._max = max_streams

    def for_recipients(self, stream: str, recipients: Mapping[str, bytes]) -> ContentKey:
        """The stream's key wrapped for exactly `recipients` (name -> X25519 public key):
        the same key with wraps added if they are a superset of the last set, else a new key.
        The least recently used stream is forgotten past `max_streams`: an aggregator sealing a
        `job_key` for each of 10,000 nodes (a stream each) evicted, first in first out at 4,096,
        the model's stream whose key it had just given them, and sealed the model with a new one."""
        current = self._keys.get(stream)
        if current is not None:
            self._keys.move_to_end(stream)
        if current is None or any(recipients.get(n) != pub for n, pub in current.recipients.items()):
            if stream not in self._keys and len(self._keys) >= self._max:
                self._keys.popitem(last=False)
            current = self._keys[stream] = ContentKey(stream)
        for name, public in recipients.items():
            current.recipients.setdefault(name, public)  # wrapped when a body carries it (ContentKey.wrap)
        return current

    def key_of(self, stream: str) -> ContentKey | None:
        """The stream's current content key (None before its first `for_recipients`)."""
        return self._keys.get(stream)


@dataclass(frozen=True)
class SealPlan:
    """What `seal_stream` writes for one body: its header and how many bytes it adds."""

    key: bytes
    nonce: bytes
    header: bytes

    @property
    def overhead(self) -> int:
        return _PREFIX.size + len(self.header) + TAG


def plan(ck: ContentKey, names: Iterable[str]) -> SealPlan:
    """The sealed header for a body going to `names` (each must have a wrap in `ck`)."""
    nonce = os.urandom(NONCE)
    header = msgpack.packb({"s": ck.stream, "e": ck.eph_pub, "n": nonce,
                            "w": {n: ck.wrap(n) for n in sorted(names)}}, use_bin_type=True)
    return SealPlan(ck.key, nonce, header)


def seal_stream(p: SealPlan, aad: bytes, parts: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """The sealed body, piece by piece, as `parts` (the clear body) are encrypted."""
    enc = Cipher(algorithms.AES(p.key), modes.GCM(p.nonce)).encryptor()
    enc.authenticate_additional_data(aad + p.header)
    yield _PREFIX.pack(MARK, VERSION, len(p.header)) + p.header
    for part in parts:
        yield enc.update(part)
    enc.finalize()
    yield enc.tag


def seal_body(ck: ContentKey, names: Iterable[str], aad: bytes, clear: bytes) -> bytes:
    """The whole sealed body at once (tests, small messages)."""
    return b"".join(bytes(piece) for piece in seal_stream(plan(ck, names), aad, [clear]))


def _parse(body: memoryview) -> tuple[dict, memoryview, memoryview, bytes]:
    """(header, header bytes, ciphertext, tag) of a sealed body; SealError if malformed."""
    if len(body) < _PREFIX.size + TAG:
        raise SealError("bad_seal", "sealed body too short")
    mark, version, n = _PREFIX.unpack_from(body, 0)
    if mark != MARK or version != VERSION:
        raise SealError("bad_seal", f"unknown sealing version {version}")
    if n > _MAX_HEADER or _PREFIX.size + n + TAG > len(body):
        raise SealError("bad_seal", f"sealed header of {n} bytes does not fit")
    raw = body[_PREFIX.size : _PREFIX.size + n]
    try:
        header = msgpack.unpackb(raw, raw=False, max_bin_len=_MAX_HEADER, max_map_len=1_000_000)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SealError("bad_seal", f"undecodable sealed header: {type(exc).__name__}") from None
    ok = (isinstance(header, dict) and isinstance(header.get("s"), str) and isinstance(header.get("w"), dict)
          and isinstance(header.get("e"), bytes) and len(header["e"]) == KEY_BYTES
          and isinstance(header.get("n"), bytes) and len(header["n"]) == NONCE)
    if not ok:
        raise SealError("bad_seal", "sealed header lacks stream, ephemeral key, nonce or wraps")
    return header, raw, body[_PREFIX.size + n : len(body) - TAG], bytes(body[len(body) - TAG :])


def recipients(body: bytes | bytearray | memoryview) -> list[str]:
    """Who a sealed body was sealed for (read from its header; for tests and diagnostics)."""
    return sorted(_parse(memoryview(body).cast("B"))[0]["w"])


def content_key(keyring: Keyring, body: bytes | bytearray | memoryview) -> bytes:
    """The content key of a sealed body, unwrapped with `keyring` (SealError if not for it):
    what a recipient hands on to a late one (the aggregator to a node joining a job)."""
    return unwrap(keyring, header_of(body))


def header_of(body: bytes | bytearray | memoryview) -> dict:
    """A sealed body's header (stream, ephemeral key, nonce, wraps); SealError if malformed.
    Parsed once, it serves every recipient in a process (`unwrap`): the simulated fleet's 10,000
    sites each parsed a job's 10,000 wraps."""
    return _parse(memoryview(body).cast("B"))[0]


def unwrap(keyring: Keyring, header: dict) -> bytes:
    """The content key in `header`'s wrap for `keyring` (SealError if none, or it does not open)."""
    wrapped = header["w"].get(keyring.name)
    if not isinstance(wrapped, bytes):
        raise SealError("not_a_recipient", f"sealed for {len(header['w'])} recipient(s), not for {keyring.name}")
    seen = (header["s"], header["e"], wrapped)
    if seen in keyring.unwrapped:  # the same wrap opened before: the same key (a pure function of it)
        keyring.unwrapped.move_to_end(seen)
        return keyring.unwrapped[seen]
    try:
        peer = x25519.X25519PublicKey.from_public_bytes(header["e"])
        wk = _wrap_key(keyring.private.exchange(peer), header["s"], keyring.name, header["e"], keyring.public)
        key = AESGCM(wk).decrypt(_WRAP_NONCE, wrapped, header["s"].encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError("bad_seal", f"the wrap for {keyring.name} does not open ({type(exc).__name__})") from None
    keyring.unwrapped[seen] = key
    while len(keyring.unwrapped) > UNWRAPPED_KEPT:
        keyring.unwrapped.popitem(last=False)
    return key


def open_with_key(key: bytes, aad: bytes, body: bytes | bytearray | memoryview) -> memoryview:
    """The clear body of a sealed one, given its content key; SealError if it does not decrypt."""
    header, raw, ciphertext, tag = _parse(memoryview(body).cast("B"))
    try:
        dec = Cipher(algorithms.AES(key), modes.GCM(header["n"], tag)).decryptor()
        dec.authenticate_additional_data(aad + bytes(raw))
        out = bytearray(len(ciphertext) + 15)
        n = dec.update_into(ciphertext, out)
        dec.finalize()
    except (InvalidTag, ValueError) as exc:
        raise SealError("bad_seal", f"does not decrypt ({type(exc).__name__})") from None
    return memoryview(out)[:n]


def open_body(keyring: Keyring, aad: bytes, body: bytes | bytearray | memoryview) -> memoryview:
    """The clear body of a sealed one, if `keyring` is among its recipients; else SealError."""
    return open_with_key(content_key(keyring, body), aad, body)
