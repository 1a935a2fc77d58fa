"""Shared set-up of the secure-aggregation tests: a 10-site round and its plain reference."""

from __future__ import annotations

import numpy as np

from common.secagg.config import SecAggConfig
from common.secagg.encoding import Encoding

SITES = [f"site{i:02d}" for i in range(10)]


def config(dim: int = 257, threshold: int = 5, neighbours: int = 8, round_: int = 1) -> SecAggConfig:
    return SecAggConfig("job-x", round_, threshold, neighbours, Encoding(2.0, len(SITES), 10_000), dim,
                        b"public-round-seed")


def inputs(dim: int = 257, seed: int = 0) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return {s: (rng.normal(0, 1, dim), int(rng.integers(1, 10_000))) for s in SITES}


def plain_sum(data: dict[str, tuple[np.ndarray, int]], who, clip: float = 2.0) -> tuple[np.ndarray, int]:
    """The reference: sum of count * clipped values over `who`, and the total count."""
    return (sum(data[s][1] * np.clip(data[s][0], -clip, clip) for s in who),
            sum(data[s][1] for s in who))
