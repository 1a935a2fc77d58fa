"""A seed expanded into a uint32 vector: ChaCha20 keystream (fast, from `cryptography`).

Each seed is derived for one purpose, pair, job and round (see `keys`), so the fixed nonce is
never reused with the same key.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter + 12-byte nonce, all zero


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 values from a 32-byte seed (read-only on little-endian)."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32, copy=False)
