"""The public parameters of one secure-aggregation round, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from common.secagg.encoding import Encoding
from common.secagg.keys import Context


class SecAggError(ValueError):
    """A parameter, a message or a stage that breaks the protocol."""


@dataclass(frozen=True)
class SecAggConfig:
    """What every party of a round knows: job, round, threshold T, neighbours k, encoding, size.

    T of k: a site's secrets are shared among its k neighbours, any T reconstruct them. T > k/2
    because an honest neighbour hands the server either a site's b_u share or its s_sk share,
    never both: with T > k/2 the server can never gather T of each for the same site.
    """

    job: str
    round: int
    threshold: int
    neighbours: int
    encoding: Encoding
    dim: int
    round_seed: bytes

    def __post_init__(self) -> None:
        check_parameters(self.threshold, self.neighbours)
        if self.dim < 1:
            raise SecAggError(f"dim must be >= 1, got {self.dim}")
        if len(self.round_seed) < 16:
            raise SecAggError("round_seed must be at least 16 bytes")

    @property
    def context(self) -> Context:
        return Context(self.job, self.round)


def check_parameters(threshold: int, neighbours: int) -> None:
    """Refuse a (T, k) that is insecure or cannot work, with the reason."""
    if neighbours < 2 or neighbours % 2:
        raise SecAggError(f"neighbours k must be even and >= 2 (a Harary graph), got {neighbours}")
    if not neighbours // 2 < threshold <= neighbours:
        raise SecAggError(f"threshold T must satisfy k/2 < T <= k (k={neighbours}), got {threshold}")
