"""The SecAgg+ neighbour graph (Bell et al., CCS 2020): each site masks with k neighbours only.

Why: full SecAgg costs every site O(n) key agreements, shares and PRG expansions; with k of
order log n neighbours the cost per site is O(k) and the total O(n k). The graph is a Harary
graph H(n, k) over the participants in an order shuffled by a PUBLIC round seed, so every
party derives the same graph and no one picks whom a site is linked to. With k >= n - 1 it
is the complete graph (plain SecAgg).
"""

from __future__ import annotations

import hashlib


def _order(participants: list[str], round_seed: bytes) -> list[str]:
    """The participants sorted by a keyed hash: a public, deterministic shuffle."""
    return sorted(participants, key=lambda p: hashlib.sha256(round_seed + b"\x00" + p.encode()).digest())


def effective_degree(n: int, k: int) -> int:
    """The number of neighbours each of `n` sites gets for a requested (even) `k`."""
    return min(n - 1, k + (k % 2))


def _ring(participants: list[str], k: int, round_seed: bytes) -> tuple[list[str], int]:
    """The shuffled order and how many places either side are neighbours (n: all of them)."""
    n = len(set(participants))
    if n != len(participants):
        raise ValueError("duplicate participants")
    return _order(participants, round_seed), n if effective_degree(n, k) >= n - 1 else (k + 1) // 2


def _around(order: list[str], i: int, half: int) -> frozenset[str]:
    n = len(order)
    if half >= n:
        return frozenset(order[:i] + order[i + 1:])
    return frozenset(order[j % n] for j in range(i - half, i + half + 1) if j != i)


def neighbours(participants: list[str], k: int, round_seed: bytes) -> dict[str, frozenset[str]]:
    """Each participant's neighbours: those within k/2 places of it on the shuffled ring."""
    order, half = _ring(participants, k, round_seed)
    return {p: _around(order, i, half) for i, p in enumerate(order)}


def neighbours_of(participants: list[str], k: int, round_seed: bytes, who: str) -> frozenset[str]:
    """One participant's neighbours (what a site needs: O(n log n), not the whole graph)."""
    order, half = _ring(participants, k, round_seed)
    return _around(order, order.index(who), half)
