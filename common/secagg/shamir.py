"""Shamir t-of-n secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

Why this field: it holds any 32-byte secret (< 2^256) with room, so a reconstruction from
inconsistent or too few shares lands above 2^256 with probability ~1 - 2^-265 and is refused
instead of returning garbage silently.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Too few shares, duplicated x, or shares that do not reconstruct a 32-byte secret."""


@dataclass(frozen=True)
class Share:
    x: int  # the holder's public index, 1..n
    y: int

    def y_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, y: bytes) -> Share:
        value = int.from_bytes(y, "big")
        if len(y) != SHARE_BYTES or value >= PRIME:
            raise ShamirError("malformed share")
        return cls(x, value)


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, Share]:
    """Shares of `secret` for the holders `xs`; any `threshold` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} not in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share x must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: Share(x, _horner(coeffs, x)) for x in xs}


def _horner(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def interpolate_at_zero(shares: list[Share]) -> int:
    """The polynomial through `shares`, evaluated at 0 (Lagrange); no threshold check."""
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate share x")
    total = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        total = (total + si.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: list[Share], threshold: int) -> bytes:
    """The secret from at least `threshold` shares; ShamirError with fewer or inconsistent ones."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, threshold is {threshold}")
    value = interpolate_at_zero(shares[:threshold])
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("shares do not reconstruct a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")
