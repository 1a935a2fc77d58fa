"""Fixed-point encoding of sample-weighted updates in the ring Z_2^32.

Why this shape: masks are uniform in Z_2^32, so the sum must be computed there, and it must not
wrap. A site with `count` samples (clipped to `max_count`, M) sends, per coordinate,

    q = round(clip(x, -R, R) * (count / M) * s)        with  s = Q / R,  Q = floor((2^31 - 1) / n)

so |q| <= Q and the sum of at most n sites stays inside (-2^31, 2^31): no wrap, whatever the
inputs. Rounding AFTER weighting keeps the precision of heavy sites. The count itself rides in
one extra coordinate, unscaled (n * M < 2^32 is required), so the server learns only the total.

Bound (per coordinate, for the sum of m <= n sites with total count W):
    |decoded weighted sum - sum_u count_u * clip(x_u)| <= m * M * R / (2 * Q)
    |decoded weighted mean - true weighted mean|       <= m * M * R / (2 * Q * W)
With every count at M (W = m M) the mean error is at most R / (2 Q) ~= n R / 2^32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RING_BITS = 32
HALF = 1 << (RING_BITS - 1)


@dataclass(frozen=True)
class Encoding:
    """Public encoding parameters: clip R, the most sites n summed, the largest count M."""

    clip: float
    max_sites: int
    max_count: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if self.max_sites < 1 or self.max_count < 1:
            raise ValueError("max_sites and max_count must be >= 1")
        if self.max_sites * self.max_count >= 1 << RING_BITS:
            raise ValueError(f"max_sites * max_count must be < 2^32 (the count sum must not wrap), "
                             f"got {self.max_sites} * {self.max_count}")

    @property
    def q_max(self) -> int:
        """Q: the largest |integer| one site may contribute to a coordinate."""
        return (HALF - 1) // self.max_sites

    @property
    def scale(self) -> float:
        return self.q_max / self.clip

    def sum_error_bound(self, sites: int) -> float:
        """Largest error per coordinate of the decoded weighted SUM of `sites` sites."""
        return sites * self.max_count * self.clip / (2 * self.q_max)

    def mean_error_bound(self, sites: int, total_count: int) -> float:
        """Largest error per coordinate of the decoded weighted MEAN."""
        return self.sum_error_bound(sites) / total_count

    def encode(self, values: np.ndarray, count: int) -> np.ndarray:
        """The site's contribution: weighted, clipped, rounded values and its count, in Z_2^32."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        weight = min(count, self.max_count) / self.max_count
        x = np.clip(np.asarray(values, dtype=np.float64).ravel(), -self.clip, self.clip)
        q = np.rint(x * weight * self.scale).astype(np.int64)
        out = np.empty(q.size + 1, dtype=np.uint32)
        out[:-1] = q.astype(np.uint32)  # two's complement: negative values wrap into the ring
        out[-1] = min(count, self.max_count)
        return out

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """(sum_u count_u * x_u, sum_u count_u) from the ring sum of encoded contributions."""
        total = int(ring_sum[-1])
        signed = ring_sum[:-1].astype(np.uint32).view(np.int32).astype(np.float64)
        return signed * (self.max_count / self.scale), total


def ring_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b in Z_2^32 (uint32 arithmetic wraps)."""
    return (a.astype(np.uint32) + b.astype(np.uint32)).astype(np.uint32)


def ring_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b in Z_2^32."""
    return (a.astype(np.uint32) - b.astype(np.uint32)).astype(np.uint32)
