"""The masks a site adds to its encoded input (Bonawitz et al.): pairwise and self.

    y_u = x_u + PRG(b_u) + sum_{v in N(u), u < v} PRG(s_uv) - sum_{v in N(u), u > v} PRG(s_uv)

The sign is fixed by the order of the two identities, so the pair's masks cancel in the sum;
PRG(b_u) is removed by the server only for sites whose input is in the sum.
"""

from __future__ import annotations

import numpy as np

from common.secagg import prg
from common.secagg.keys import Context, KeyPair, agree

MASK_PURPOSE = "mask"


def pair_seed(ctx: Context, mine: KeyPair, me: str, their_public: bytes, them: str) -> bytes:
    return agree(ctx, MASK_PURPOSE, mine, me, their_public, them)


def pairwise_mask(seed: bytes, me: str, other: str, length: int) -> np.ndarray:
    """The pair's mask as `me` adds it: +PRG(seed) if me < other, else -PRG(seed) (in Z_2^32)."""
    stream = prg.expand(seed, length)
    return stream.copy() if pair_sign(me, other) > 0 else (np.uint32(0) - stream).astype(np.uint32)


def self_mask(b: bytes, length: int) -> np.ndarray:
    return prg.expand(b, length)


def pair_sign(me: str, other: str) -> int:
    """+1 if `me` adds the pair's mask, -1 if it subtracts it (the smaller name adds)."""
    return 1 if me < other else -1


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """acc += sign * PRG(seed) in Z_2^32, in place: one keystream, no copies of the vector."""
    stream = prg.expand(seed, acc.size)
    (np.add if sign > 0 else np.subtract)(acc, stream, out=acc)
