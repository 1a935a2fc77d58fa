"""The SecAgg+ neighbour graph (Bell et al., CCS 2020): each site masks with k neighbours only.

Why: full SecAgg costs every site O(n) key agreements, shares and PRG expansions; with k of
order log n neighbours the cost per site is O(k) and the total O(n k). The graph is a Harary
graph H(n, k) over the participants in an order shuffled by a PUBLIC round seed, so every
party derives the same graph and no one picks whom a site is linked to. With k >= n - 1 it
is the complete graph (plain SecAgg).
"""

from __future__ import annotations

import hashlib

import numpy as np


def _order(participants: list[str], round_seed: bytes) -> list[str]:
    """The participants sorted by a keyed hash: a public, deterministic shuffle."""
    return sorted(participants, key=lambda p: hashlib.sha256(round_seed + b"\x00" + p.encode()).digest())


def effective_degree(n: int, k: int) -> int:
    """The number of neighbours each of `n` sites gets for a requested (even) `k`."""
    return min(n - 1, k + (k % 2))


def neighbours(participants: list[str], k: int, round_seed: bytes) -> dict[str, frozenset[str]]:
    """Each participant's neighbours: those within k/2 places of it on the shuffled ring."""
    n = len(set(participants))
    if n != len(participants):
        raise ValueError("duplicate participants")
    order = _order(participants, round_seed)
    if effective_degree(n, k) >= n - 1:
        return {p: frozenset(order) - {p} for p in order}
    half = (k + 1) // 2
    out: dict[str, frozenset[str]] = {}
    for i, p in enumerate(order):
        idx = np.concatenate([np.arange(i - half, i), np.arange(i + 1, i + half + 1)]) % n
        out[p] = frozenset(order[j] for j in idx)
    return out
