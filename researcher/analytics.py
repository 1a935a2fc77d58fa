"""Federated analytics: global statistics from the nodes' sufficient statistics.

    stats = federated_statistics(bundle, ["site-1", "site-2"], tags=["brain"])
    exp = Experiment(..., training_args={"standardize": stats.standardization()})

No row leaves a node: each returns its count and per-feature sums and sums of squares (and
histogram counts on shared bin edges); the combination is exact, so the global mean and
standard deviation equal those of the pooled data (population sd, ddof = 0). What a node holds
back is its site's choice (node.toml `[statistics]`): min/max only where the site allows
extremes (`None` here unless every node sent them), histogram cells under the site's minimum
count sent as 0 (`suppressed_cells` counts them), and a cap on the number of bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.identity import Identity
from common.settings import TransportSettings
from researcher.ask import ask


class StatisticsError(RuntimeError):
    """A node refused or did not answer; the message names it and why."""


@dataclass(frozen=True)
class GlobalStatistics:
    n: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray | None
    max: np.ndarray | None
    per_node: dict[str, int]
    hist: np.ndarray | None = None
    suppressed_cells: int = 0
    refused: dict[str, str] = field(default_factory=dict)

    def standardization(self) -> dict[str, list[float]]:
        """The `standardize` training argument: nodes apply (x - mean) / std before training."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def combine(parts: dict[str, dict[str, Any]]) -> GlobalStatistics:
    """Pool the nodes' sufficient statistics (pure)."""
    if not parts:
        raise StatisticsError("no node returned statistics")
    n = sum(int(p["n"]) for p in parts.values())
    total = sum(np.asarray(p["sum"], dtype=np.float64) for p in parts.values())
    total_sq = sum(np.asarray(p["sumsq"], dtype=np.float64) for p in parts.values())
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    hists = [np.asarray(p["hist"]) for p in parts.values() if "hist" in p]
    extremes = all("min" in p and "max" in p for p in parts.values())
    return GlobalStatistics(
        n=n, mean=mean, std=np.sqrt(var),
        min=np.min([np.asarray(p["min"]) for p in parts.values()], axis=0) if extremes else None,
        max=np.max([np.asarray(p["max"]) for p in parts.values()], axis=0) if extremes else None,
        per_node={k: int(p["n"]) for k, p in parts.items()},
        hist=sum(hists) if len(hists) == len(parts) else None,
        suppressed_cells=sum(int(p.get("suppressed_cells", 0)) for p in parts.values()),
    )


def federated_statistics(bundle: str | Identity, nodes: list[str], *, tags: list[str], bins: int = 0,
                         ranges: list[list[float]] | None = None, mqtt: TransportSettings | None = None,
                         timeout_s: float = 60.0, allow_refusals: bool = False) -> GlobalStatistics:
    """Ask each node for the sufficient statistics of its dataset with `tags`, and combine them.

    A refusal (too few rows, no such dataset) raises StatisticsError unless `allow_refusals`,
    in which case the refusing nodes are left out and listed in `refused`.
    """
    identity = bundle if isinstance(bundle, Identity) else Identity.load(bundle)
    parts: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for node in nodes:
        try:
            reply = ask(identity, node, "statistics", {"tags": tags, "bins": bins, "ranges": ranges},
                        mqtt=mqtt, timeout_s=timeout_s)
        except TimeoutError as exc:
            refused[node] = str(exc)
            continue
        if reply.ok:
            parts[node] = reply.data
        else:
            refused[node] = reply.error
    if refused and not allow_refusals:
        raise StatisticsError("; ".join(f"{k}: {v}" for k, v in refused.items()))
    stats = combine(parts)
    return GlobalStatistics(**{**stats.__dict__, "refused": refused})
