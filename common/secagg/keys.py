"""Per-round key material: X25519 pairs, HKDF seeds per pair, AES-GCM boxes for routed shares.

Every site makes two fresh X25519 pairs per job and round (Bonawitz et al.): `c` encrypts the
shares it routes through the server, `s` derives its pairwise masks. Only `s_sk` is ever
secret-shared, so recovering a dropped site's masks never opens the boxes of its shares.
Every derivation binds the job, the round, the purpose and both identities (in sorted order, so
both ends derive the same bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_RAW = serialization.Encoding.Raw
_NONCE_BYTES = 12


class BoxError(ValueError):
    """A share box that does not open: wrong key, wrong pair or round, or tampered."""


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Context:
    """What every derived key is bound to: the job and its round."""

    job: str
    round: int

    def info(self, purpose: str, a: str, b: str) -> bytes:
        lo, hi = sorted((a, b))
        return "\x00".join(("fbm-secagg-v1", purpose, self.job, str(self.round), lo, hi)).encode()


def agree(ctx: Context, purpose: str, mine: KeyPair, me: str, their_public: bytes, them: str) -> bytes:
    """The 32-byte seed two sites share for `purpose` (X25519, then HKDF-SHA256)."""
    shared = mine.private.exchange(X25519PublicKey.from_public_bytes(their_public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=ctx.info(purpose, me, them)).derive(shared)


def _aad(ctx: Context, sender: str, recipient: str) -> bytes:
    return "\x00".join(("fbm-secagg-box", ctx.job, str(ctx.round), sender, recipient)).encode()


def seal(key: bytes, ctx: Context, sender: str, recipient: str, plaintext: bytes) -> bytes:
    """AES-GCM box from `sender` to `recipient`: nonce || ciphertext, bound to both and the round."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(ctx, sender, recipient))


def open_box(key: bytes, ctx: Context, sender: str, recipient: str, box: bytes) -> bytes:
    """The plaintext of `seal`, or BoxError."""
    try:
        return AESGCM(key).decrypt(box[:_NONCE_BYTES], box[_NONCE_BYTES:], _aad(ctx, sender, recipient))
    except (InvalidTag, ValueError) as exc:
        raise BoxError(f"share box {sender} -> {recipient} does not open") from exc
