"""Shamir over GF(2^521 - 1): any T shares reconstruct, fewer refuse (or give garbage)."""

from __future__ import annotations

import itertools
import os
import secrets

import pytest

from common.secagg import shamir


def test_any_t_of_n_reconstruct():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares.values(), 3):
        assert shamir.reconstruct(list(subset), 3) == secret
    assert shamir.reconstruct(list(shares.values()), 3) == secret


def test_fewer_than_t_refuse_and_interpolation_gives_garbage():
    secret = os.urandom(32)
    shares = list(shamir.split(secret, 4, list(range(1, 8))).values())
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.reconstruct(shares[:3], 4)
    guess = shamir.interpolate_at_zero(shares[:3])
    assert guess != int.from_bytes(secret, "big")
    assert guess >= 2**256  # outside the secret space: what reconstruct checks


def test_inconsistent_shares_are_refused():
    """A share replaced by an unrelated value (a mix-up, a corruption) is caught; a crafted
    small offset is not (integrity of shares is not Shamir's job: the boxes are authenticated)."""
    shares = list(shamir.split(os.urandom(32), 3, [1, 2, 3]).values())
    shares[1] = shamir.Share(shares[1].x, secrets.randbelow(shamir.PRIME))
    with pytest.raises(shamir.ShamirError, match="32-byte"):
        shamir.reconstruct(shares, 3)


def test_share_bytes_round_trip_and_bad_inputs():
    s = shamir.split(bytes(32), 2, [1, 2])[1]
    assert shamir.Share.from_bytes(1, s.y_bytes()) == s
    with pytest.raises(shamir.ShamirError):
        shamir.Share.from_bytes(1, b"\xff" * shamir.SHARE_BYTES)  # >= p
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(31), 2, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 2, [1, 1])
